"""Resolving MODEL_PATH into a checked local directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from function.engine.engine import Engine
from function.errors import ModelLoadError
from function.weights.allowlist import check_model_path
from function.weights.resolve import model_name_from_path, resolve_weights
from tests.support.model_files import copy_model
from tests.support.settings import make_settings


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


def link_out(model_dir: Path, name: str, outside: Path) -> None:
    """Move the model's file `name` to `outside` and leave a symlink to it in its place."""
    outside.mkdir(parents=True, exist_ok=True)
    shutil.move(model_dir / name, outside / name)
    (model_dir / name).symlink_to(outside / name)


@pytest.mark.parametrize("name", ["model.safetensors", "config.json", "tokenizer.json"])
def test_a_file_linked_out_of_the_model_directory_is_refused(
    demo_model_dir: Path, tmp_path: Path, name: str
) -> None:
    # GIVEN a model directory whose file is a symlink to a copy outside it
    model_dir = copy_model(demo_model_dir, tmp_path / "models" / "linked")
    link_out(model_dir, name, tmp_path / "elsewhere")
    engine = Engine(make_settings(allowed_model_paths=[str(tmp_path / "models")]))

    # WHEN /load_model asks for it THEN it is refused before anything is read through the link
    with pytest.raises(ModelLoadError) as error:
        engine.load_requested(str(model_dir))
    assert f"model file {name} is a link outside the model directory" in error.value.message
    assert str(tmp_path) not in error.value.message
    assert engine.current is None


def test_load_model_follows_a_link_only_into_allowed_model_paths(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN weights linked from models/linked/ to elsewhere/
    model_dir = copy_model(demo_model_dir, tmp_path / "models" / "linked")
    link_out(model_dir, "model.safetensors", tmp_path / "elsewhere")

    # WHEN /load_model may load from models/ only THEN the link is refused
    narrow = Engine(make_settings(allowed_model_paths=[str(tmp_path / "models")]))
    with pytest.raises(ModelLoadError, match="is a link outside the model directory"):
        narrow.load_requested(str(model_dir))

    # AND WHEN elsewhere/ is allowed too THEN the model loads
    wide = Engine(make_settings(allowed_model_paths=[str(tmp_path / "models"), str(tmp_path / "elsewhere")]))
    loaded, _ = wide.load_requested(str(model_dir))
    assert loaded.parameter_count > 0


def test_links_inside_the_model_directory_are_followed(demo_model_dir: Path, tmp_path: Path) -> None:
    # GIVEN a model directory whose weights are a link to a file beside them (a cache layout)
    model_dir = copy_model(demo_model_dir, tmp_path / "model")
    (model_dir / "blobs").mkdir()
    shutil.move(model_dir / "model.safetensors", model_dir / "blobs" / "0123abcd")
    (model_dir / "model.safetensors").symlink_to(Path("blobs") / "0123abcd")

    assert resolve_weights(str(model_dir), tmp_path / "cache").kind == "model"


def test_a_folder_linked_out_of_the_model_directory_is_refused(demo_model_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_model(demo_model_dir, tmp_path / "model")
    (tmp_path / "elsewhere").mkdir()
    (model_dir / "extra").symlink_to(tmp_path / "elsewhere")

    def only_the_model(path: str) -> None:
        check_model_path(path, [str(model_dir)])

    with pytest.raises(ModelLoadError, match="model file extra is a link outside the model directory"):
        resolve_weights(str(model_dir), tmp_path / "cache", check_path=only_the_model)


def test_the_start_up_model_may_be_a_hugging_face_cache_snapshot(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN the hub cache's layout: snapshots/<rev>/ holds links into ../../blobs/
    snapshot = copy_model(demo_model_dir, tmp_path / "hub" / "snapshots" / "abc123")
    blobs = tmp_path / "hub" / "blobs"
    blobs.mkdir()
    for path in list(snapshot.iterdir()):
        shutil.move(path, blobs / path.name)
        path.symlink_to(Path("..") / ".." / "blobs" / path.name)

    # WHEN it is the operator's MODEL_PATH (not a runtime /load_model) THEN the links are followed
    engine = Engine(make_settings(model_path=str(snapshot)))
    engine.load_startup_model()

    assert engine.status().state == "healthy"
