"""Faults: nothing lost, clear answers. Swaps under load, out-of-memory loads, bad weights from S3."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from function.app import create_app
from function.engine import ModelManager, SamplingParams
from function.errors import ModelLoadError
from function.fetch import MANIFEST_NAME
from tests.conftest import make_settings
from tests.s3_helpers import upload_model

GREEDY = SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.0)


def test_swaps_under_a_stream_of_requests(demo_model_dir: Path, other_model_dir: Path) -> None:
    # GIVEN the greedy text of each model
    engine = ModelManager(make_settings(model_path=str(demo_model_dir)))
    engine.load_startup_model()
    expected = {"final_model": engine.generate("Python", GREEDY).continuations[0]}
    engine.load(str(other_model_dir))
    expected["other_model"] = engine.generate("Python", GREEDY).continuations[0]
    assert expected["final_model"] != expected["other_model"]

    # WHEN four clients generate while the model is swapped back and forth
    results: list[tuple[str, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            result = engine.generate("Python", GREEDY)
            results.append((result.model_name, result.continuations[0]))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for path in (demo_model_dir, other_model_dir) * 3:
        engine.load(str(path))
        seen, deadline = len(results), time.monotonic() + 30
        while len(results) < seen + 4 and time.monotonic() < deadline:  # let answers arrive between swaps
            time.sleep(0.005)
    stop.set()
    for thread in threads:
        thread.join()

    # THEN every answer is entirely one model's
    assert len(results) >= 24
    assert {name for name, _ in results} == {"final_model", "other_model"}
    for name, text in results:
        assert text == expected[name]


def test_out_of_memory_during_a_load_keeps_the_old_model(
    fresh_engine: ModelManager, other_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Failure injection: CUDA OOM can't happen on a CPU-only machine, so from_pretrained raises it.
    from transformers import AutoModelForCausalLM

    def out_of_memory(*_: Any, **__: Any) -> Any:
        raise torch.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 22.06 GiB total)"
        )

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", out_of_memory)
    client = TestClient(create_app(fresh_engine.settings, fresh_engine))

    response = client.post("/load_model", params={"model_path": str(other_model_dir)})

    assert response.status_code == 400
    assert "does not fit in memory" in response.json()["error"]["message"]
    monkeypatch.undo()
    assert client.get("/health").json()["model_name"] == "final_model"
    assert client.post("/generate", json={"prompt": "x", "max_new_tokens": 2}).status_code == 200


@pytest.fixture
def s3(moto_s3: Any) -> Any:
    return moto_s3


def test_corrupt_weights_from_s3_are_rejected_and_the_old_model_serves(
    s3: Any, demo_model_dir: Path, other_model_dir: Path, tmp_path: Path
) -> None:
    upload_model(s3, "models", "team/other_model/", other_model_dir)
    data = bytearray((other_model_dir / "model.safetensors").read_bytes())
    data[len(data) // 2] ^= 0x01
    s3.put_object(Bucket="models", Key="team/other_model/model.safetensors", Body=bytes(data))
    engine = ModelManager(
        make_settings(
            model_path=str(demo_model_dir),
            model_cache_dir=tmp_path / "cache",
            allowed_model_paths=["s3://models/team/"],
        )
    )
    engine.load_startup_model()

    with pytest.raises(ModelLoadError, match="SHA-256"):
        engine.load_requested("s3://models/team/other_model/")

    assert engine.current is not None and engine.current.name == "final_model"
    assert not list((tmp_path / "cache").rglob("*.safetensors*"))
    assert MANIFEST_NAME  # the manifest is what caught it


def test_error_bodies_carry_no_traceback_path_uri_or_key(
    s3: Any, demo_model_dir: Path, tmp_path: Path
) -> None:
    key, private_uri = "secret-key-123456789", "s3://models/private/area/"
    settings = make_settings(
        model_path=private_uri,
        model_cache_dir=tmp_path / "cache",
        api_keys=[key],
        admin_api_keys=["admin-" + key],
        allowed_model_paths=[str(tmp_path), private_uri],
    )
    engine = ModelManager(settings)
    engine.load_startup_model()  # nothing under that prefix
    client = TestClient(create_app(settings, engine))
    admin = {"X-API-Key": "admin-" + key}

    responses = [
        client.get("/health"),
        client.post("/generate", json={"prompt": "x"}, headers={"X-API-Key": key}),
        client.post("/generate", json={"prompt": "x"}, headers={"X-API-Key": key + "x"}),
        client.post("/load_model", params={"model_path": str(tmp_path / "missing")}, headers=admin),
        client.post("/load_model", params={"model_path": private_uri + "deeper/"}, headers=admin),
        client.post("/load_model", params={"model_path": "/etc"}, headers=admin),
        client.post(
            "/generate", content=b"{", headers={"X-API-Key": key, "Content-Type": "application/json"}
        ),
    ]

    assert [r.status_code for r in responses] == [503, 503, 401, 400, 400, 403, 400]
    for response in responses:
        text = response.text
        for leak in ("Traceback", 'File "', str(tmp_path), "/tmp/", "s3://models", "private/area", key):
            assert leak not in text, (leak, text)
