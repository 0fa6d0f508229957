"""The demo model: offline, deterministic, Korean and English, loadable by the real loader."""

from __future__ import annotations

import json
import os
from pathlib import Path

from function.demo_model import build_demo_model, demo_corpus


def test_hub_is_offline_for_the_whole_package() -> None:
    import function.weights.loading  # noqa: F401  (the loading code forces offline mode)

    assert os.environ["HF_HUB_OFFLINE"] == "1"


def test_builds_are_identical(tmp_path: Path, demo_model_dir: Path) -> None:
    again = build_demo_model(tmp_path / "again")

    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (demo_model_dir / name).read_bytes(), name


def test_the_tokenizer_is_trained_on_korean_and_english(demo_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir, local_files_only=True)

    for text in ("Python이란 무엇인가요?", "머신러닝을 설명하세요", "What is Python?"):
        ids = tokenizer(text)["input_ids"]
        assert tokenizer.decode(ids) == text
        assert len(ids) < len(text.encode("utf-8")) / 2  # merges were learned, not raw bytes
    assert "머신러닝" in demo_corpus() and "Python" in demo_corpus()


def test_marked_as_random(demo_model_dir: Path) -> None:
    note = json.loads((demo_model_dir / "DEMO_MODEL.json").read_text(encoding="utf-8"))

    assert "Random weights" in note["note"]
    assert note["chat_template"] is False
