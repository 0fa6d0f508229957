"""PEFT adapters as MODEL_PATH: merged in full precision, unmerged over a quantized base, their base
found or refused clearly; and the named adapters of ADAPTERS loaded beside the base."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from function.engine.engine import Engine
from function.engine.types import SamplingParams
from function.errors import ModelLoadError, ModelPathNotAllowedError
from tests.support.adapters import build_lora_adapter, peft_greedy_text
from tests.support.settings import make_settings

PROMPT = "Python이란 무엇인가요?"
TOKENS = 12
GREEDY = SamplingParams(max_new_tokens=TOKENS, temperature=0, repetition_penalty=1.0)


def test_an_adapter_as_model_path_is_merged_and_answers_as_peft_does(
    demo_model_dir: Path, adapter_dir: Path
) -> None:
    # GIVEN MODEL_PATH pointing at the adapter directory a peft run wrote (its config names the base)
    engine = Engine(make_settings(model_path=str(adapter_dir)))

    # WHEN it loads and answers greedily
    engine.load_startup_model()
    loaded = engine.require_model()
    answer = engine.generate(PROMPT, GREEDY).continuations[0]

    # THEN the adapter is merged into the base (no peft wrapper left), and the text is peft's own
    assert loaded.adapter == "adapter_sql" and loaded.adapter_merged
    assert loaded.base_path == str(demo_model_dir)
    assert "peft" not in type(loaded.model).__module__
    assert answer == peft_greedy_text(demo_model_dir, {"a": adapter_dir}, PROMPT, TOKENS, merge=True)
    plain = Engine(make_settings(model_path=str(demo_model_dir)))
    plain.load_startup_model()
    assert answer != plain.generate(PROMPT, GREEDY).continuations[0]  # the adapter changes the text


def test_an_adapter_over_a_quantized_base_stays_unmerged_and_answers_as_peft_does(
    demo_model_dir: Path, adapter_dir: Path
) -> None:
    engine = Engine(make_settings(model_path=str(adapter_dir), load_in_8bit=True))

    engine.load_startup_model()
    loaded = engine.require_model()
    answer = engine.generate(PROMPT, GREEDY).continuations[0]

    assert loaded.quantization == "8bit" and loaded.adapter == "adapter_sql" and not loaded.adapter_merged
    assert type(loaded.model).__name__.startswith("Peft")
    expected = peft_greedy_text(
        demo_model_dir,
        {"default": adapter_dir},
        PROMPT,
        TOKENS,
        adapter="default",
        quantization="8bit",
    )
    assert answer == expected


def test_base_model_path_overrides_the_base_the_adapter_names(
    tmp_path: Path, demo_model_dir: Path, other_model_dir: Path
) -> None:
    # GIVEN an adapter trained on a hub model (a hub id in its config), with the base copied locally
    adapter = build_lora_adapter(demo_model_dir, tmp_path / "adapter", base_name="HuggingFaceTB/SmolLM2")

    # WHEN it loads without BASE_MODEL_PATH, THEN the error names the setting to use
    with pytest.raises(ModelLoadError, match="BASE_MODEL_PATH") as refused:
        Engine(make_settings()).load(str(adapter))
    assert refused.value.field == "base_model_path"

    # WHEN BASE_MODEL_PATH names the base, THEN it loads over that base
    engine = Engine(make_settings(model_path=str(adapter), base_model_path=str(demo_model_dir)))
    engine.load_startup_model()
    assert engine.require_model().base_path == str(demo_model_dir)


def test_an_adapter_saved_as_a_pickle_is_refused(tmp_path: Path, adapter_dir: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(adapter_dir, pickled)
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")

    with pytest.raises(ModelLoadError, match="pickle"):
        Engine(make_settings()).load(str(pickled))


def test_load_model_applies_the_allow_list_to_the_adapters_base(
    tmp_path: Path, demo_model_dir: Path, adapter_dir: Path
) -> None:
    # GIVEN an allow-list that holds the adapter but not the base it names
    allowed = tmp_path / "adapters"
    shutil.copytree(adapter_dir, allowed / "sql")
    engine = Engine(make_settings(allowed_model_paths=[str(allowed)]))

    # WHEN /load_model asks for the adapter, THEN its base is refused before it is loaded
    with pytest.raises(ModelPathNotAllowedError):
        engine.load_requested(str(allowed / "sql"))
    assert engine.current is None


def test_adapters_load_beside_the_base(
    demo_model_dir: Path, adapter_dir: Path, second_adapter_dir: Path
) -> None:
    engine = Engine(
        make_settings(
            model_path=str(demo_model_dir),
            adapters={"sql": str(adapter_dir), "chat": str(second_adapter_dir)},
        )
    )

    engine.load_startup_model()
    loaded = engine.require_model()

    assert loaded.adapters == ("sql", "chat") and loaded.adapter is None
    assert loaded.name == "final_model"


def test_model_path_as_an_adapter_and_adapters_together_are_refused(adapter_dir: Path) -> None:
    engine = Engine(make_settings(model_path=str(adapter_dir), adapters={"x": str(adapter_dir)}))

    engine.load_startup_model()

    assert engine.status().state == "unhealthy"
    assert "ADAPTERS" in (engine.status().reason or "")


def test_an_adapters_entry_that_is_a_full_model_is_refused(
    demo_model_dir: Path, other_model_dir: Path
) -> None:
    with pytest.raises(ModelLoadError, match="not a PEFT adapter"):
        Engine(make_settings()).load(str(demo_model_dir), adapters={"x": str(other_model_dir)})


def test_a_model_without_tokenizer_files_names_them(tmp_path: Path, demo_model_dir: Path) -> None:
    bare = tmp_path / "bare"
    bare.mkdir()
    for path in demo_model_dir.iterdir():
        if path.suffix == ".safetensors" or path.name == "config.json":
            shutil.copy(path, bare / path.name)

    with pytest.raises(ModelLoadError, match=r"no tokenizer files: expected tokenizer\.json"):
        Engine(make_settings()).load(str(bare))


def test_the_adapter_config_is_what_peft_writes(adapter_dir: Path, demo_model_dir: Path) -> None:
    document = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))

    assert document["base_model_name_or_path"] == str(demo_model_dir)
    assert (adapter_dir / "adapter_model.safetensors").is_file()
