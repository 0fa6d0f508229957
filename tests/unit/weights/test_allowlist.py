"""/load_model's allow-list: attacks refused before any file or network I/O."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.engine.engine import Engine
from function.errors import ModelLoadError, ModelPathNotAllowedError
from function.weights.allowlist import check_model_path, default_allowed_paths
from tests.support.settings import make_settings

_recording: list[str] = []
_active = False
IO_EVENTS = (
    "open",
    "os.listdir",
    "os.scandir",
    "os.mkdir",
    "os.remove",
    "shutil.",
    "socket.",
    "subprocess.",
    "urllib.Request",
    "http.client.connect",
)


def _audit(event: str, _args: Any) -> None:
    if _active and event.startswith(IO_EVENTS):
        _recording.append(event)


sys.addaudithook(_audit)  # hooks can't be removed; it records only while a test switches it on


@pytest.fixture
def io_events() -> Iterator[list[str]]:
    global _active
    _recording.clear()
    _active = True
    try:
        yield _recording
    finally:
        _active = False


@pytest.fixture
def allowed_root(tmp_path: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "allowed"
    shutil.copytree(demo_model_dir, root / "model")
    (tmp_path / "allowed-prefixEVIL" / "model").mkdir(parents=True)
    (root / "escape").symlink_to(tmp_path, target_is_directory=True)
    monkeypatch.chdir(tmp_path / "allowed-prefixEVIL")  # relative names resolve outside the list
    return root


def attacks(root: Path) -> list[str]:
    return [
        f"{root}/../secret",
        f"{root}/model/../../secret",
        "%2e%2e/%2e%2e/etc",
        f"{root}/%2e%2e/x",
        "/etc",
        "file:///etc/passwd",
        "http://169.254.169.254/latest/meta-data/",
        "s3://other-bucket/allowed/model/",
        "s3://models/allowed-prefixEVIL/model/",
        "s3://models/allowed/../secret/",
        f"{root}-prefixEVIL/model",
        f"{root}/escape/allowed-prefixEVIL/model",
        "gpt2",
        "org/repo",
    ]


def test_each_attack_is_refused_before_any_io(allowed_root: Path, io_events: list[str]) -> None:
    allowed = [str(allowed_root), "s3://models/allowed/"]

    for attack in attacks(allowed_root):
        with pytest.raises(ModelPathNotAllowedError):
            check_model_path(attack, allowed)

    assert io_events == []


def test_paths_inside_the_list_are_accepted(allowed_root: Path, io_events: list[str]) -> None:
    allowed = [str(allowed_root), "s3://models/allowed/"]

    check_model_path(f"{allowed_root}/model", allowed)
    check_model_path(f"{allowed_root}/model/", allowed)
    check_model_path("s3://models/allowed/model/", allowed)
    check_model_path("s3://models/allowed/deeper/model", allowed)
    assert io_events == []


def test_over_http_each_attack_is_a_403_and_the_model_keeps_serving(allowed_root: Path) -> None:
    settings = make_settings(model_path=str(allowed_root / "model"), allowed_model_paths=[])
    engine = Engine(settings)
    engine.load_startup_model()
    client = TestClient(create_app(settings, engine))

    for attack in attacks(allowed_root):
        response = client.post("/load_model", params={"model_path": attack})
        assert response.status_code == 403, (attack, response.text)
        assert response.json()["error"]["code"] == "model_path_not_allowed"
        assert str(allowed_root) not in response.text
    assert client.get("/health").json()["model_name"] == "model"


def test_the_default_list_is_the_start_up_models_parent(tmp_path: Path) -> None:
    assert default_allowed_paths("s3://models/team/final_model/") == ["s3://models/team/"]
    assert default_allowed_paths("s3://models/final_model") == ["s3://models/"]
    assert default_allowed_paths(str(tmp_path / "final_model")) == [str(tmp_path.resolve())]
    assert default_allowed_paths(None) == []
    with pytest.raises(ModelPathNotAllowedError, match="ALLOWED_MODEL_PATHS is empty"):
        check_model_path("/anything", [])


def test_runtime_loading_is_refused_on_lambda_by_default(demo_model_dir: Path) -> None:
    on_lambda = make_settings(model_path=str(demo_model_dir), aws_lambda_function_name="llm-function-dev")
    client = TestClient(create_app(on_lambda, Engine(on_lambda)))
    opted_in = make_settings(
        model_path=str(demo_model_dir),
        aws_lambda_function_name="llm-function-dev",
        allow_runtime_model_load=True,
    )
    opted_client = TestClient(create_app(opted_in, Engine(opted_in)))

    refused = client.post("/load_model", params={"model_path": str(demo_model_dir)})
    assert refused.status_code == 403
    assert "Redeploy with the new model URI" in refused.json()["error"]["message"]
    assert opted_client.post("/load_model", params={"model_path": str(demo_model_dir)}).status_code == 200


MARKER_CODE = """
from pathlib import Path
Path({marker!r}).write_text("custom model code ran")
from transformers import LlamaForCausalLM as EvilModel
"""


def test_custom_code_in_auto_map_never_runs(
    fresh_engine: Engine, demo_model_dir: Path, tmp_path: Path
) -> None:
    model = tmp_path / "evil_model"
    shutil.copytree(demo_model_dir, model)
    marker = tmp_path / "marker"
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text(MARKER_CODE.format(marker=str(marker)))
    client = TestClient(create_app(fresh_engine.settings, fresh_engine))

    with pytest.raises(ModelLoadError, match="auto_map"):
        fresh_engine.load(str(model))
    response = client.post("/load_model", params={"model_path": str(model)})

    assert response.status_code == 400 and "custom code" in response.json()["error"]["message"]
    assert not marker.exists()
    assert fresh_engine.current is not None and fresh_engine.current.name == "final_model"
