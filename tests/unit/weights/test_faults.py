"""Load faults: nothing lost, clear answers. Out-of-memory loads, bad weights from S3.

(Swaps under a stream of requests are in tests/unit/engine/test_engine.py; error bodies that leak
nothing, in tests/unit/api/test_errors.py.)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.engine.engine import Engine
from function.errors import ModelLoadError
from function.weights.integrity import MANIFEST_NAME
from tests.support.s3 import upload_model
from tests.support.settings import make_settings


def test_out_of_memory_during_a_load_keeps_the_old_model(
    fresh_engine: Engine, other_model_dir: Path, monkeypatch: pytest.MonkeyPatch
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
    engine = Engine(
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
