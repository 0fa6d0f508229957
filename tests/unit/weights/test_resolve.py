"""Resolving MODEL_PATH into a checked local directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from function.errors import ModelLoadError
from function.weights.resolve import model_name_from_path, resolve_weights


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("outputs/checkpoints/final_model", "final_model"),
        ("outputs/checkpoints/final_model/", "final_model"),
        ("/abs/models/v2", "v2"),
        ("s3://bucket/models/final_model", "final_model"),
        ("s3://bucket/models/final_model/", "final_model"),
        ("s3://bucket/top", "top"),
    ],
)
def test_model_name_is_the_last_part(path: str, name: str) -> None:
    assert model_name_from_path(path) == name


def test_a_local_model_directory_resolves(demo_model_dir: Path) -> None:
    resolved = resolve_weights(str(demo_model_dir), demo_model_dir.parent / "cache")

    assert resolved.local_dir == demo_model_dir.resolve()
    assert resolved.name == "final_model"
    assert resolved.source == str(demo_model_dir)


@pytest.mark.parametrize("path", ["file:///etc", "http://169.254.169.254/latest", "hf://gpt2"])
def test_other_url_schemes_are_refused(path: str) -> None:
    with pytest.raises(ModelLoadError, match="other URL schemes are refused"):
        resolve_weights(path, Path("unused-cache"))


@pytest.mark.parametrize("hub_id", ["gpt2", "meta-llama/Llama-2-7b-hf"])
def test_hub_ids_are_not_fetched(hub_id: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)

    with pytest.raises(ModelLoadError, match="offline"):
        resolve_weights(hub_id, tmp_path / "cache")


def test_a_directory_without_config_is_refused(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")

    with pytest.raises(ModelLoadError, match=r"config\.json"):
        resolve_weights(str(tmp_path), tmp_path / "cache")


def test_a_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}", encoding="utf-8")

    with pytest.raises(ModelLoadError, match="safetensors"):
        resolve_weights(str(tmp_path), tmp_path / "cache")
