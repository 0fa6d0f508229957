"""SnapStart, emulated: the INIT runs once with its weights in SeaweedFS, the snapshot point is a fork,
and each restored environment is served by the real Runtime Interface Emulator (tests.support.snapstart)."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.events import http_body, load_event
from tests.support.local_aws import LambdaEmulator, SeaweedFS
from tests.support.s3 import upload_model
from tests.support.snapstart import SnapStartEmulation

pytestmark = pytest.mark.emulator
BUCKET = "weights"
MODEL = f"s3://{BUCKET}/snapstart/final_model/"


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    upload_model(client, BUCKET, "snapstart/final_model/", demo_model_dir)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def snapstart(
    seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[SnapStartEmulation, list[LambdaEmulator]]]:
    root = tmp_path_factory.mktemp("snapstart")
    environment = {
        **seaweed.environment(),
        "MODEL_PATH": MODEL,
        "MODEL_CACHE_DIR": str(root / "tmp"),
        "HF_HOME": str(root / "hf"),
        "CPU_DTYPE": "float32",
    }
    emulation = SnapStartEmulation(environment, root).start()
    try:
        restored = [emulation.restore(), emulation.restore()]
        yield emulation, restored
    finally:
        emulation.stop()


def sampled(function: LambdaEmulator) -> list[str]:
    body = {"prompt": "Hello", "max_new_tokens": 24, "temperature": 1.0, "top_k": 0, "top_p": 1.0}
    response = function.invoke({"path": "/generate", "method": "POST", "body": body})
    assert response["statusCode"] == 200, response
    return list(response["body"]["generated_text"])


def test_the_init_keeps_no_weight_bytes_on_local_disk(
    snapstart: tuple[SnapStartEmulation, list[LambdaEmulator]], demo_model_dir: Path
) -> None:
    emulation, restored = snapstart
    cache = Path(emulation.environment["MODEL_CACHE_DIR"])

    info = restored[0].invoke({"path": "/model_info", "method": "GET"})["body"]

    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files, "the small files (config, tokenizer) are cached on disk"
    assert not [p for p in files if p.suffix == ".safetensors" or p.name.endswith(".part")]
    weights = (demo_model_dir / "model.safetensors").stat().st_size
    assert sum(p.stat().st_size for p in files) < weights / 4
    assert info["cold_start"]["fetch_in_memory"] is True
    assert info["cold_start"]["fetch_bytes"] >= weights


def test_hooks_are_registered_and_no_s3_connection_goes_into_the_snapshot(
    snapstart: tuple[SnapStartEmulation, list[LambdaEmulator]], seaweed: SeaweedFS
) -> None:
    emulation, _ = snapstart

    report = emulation.snapshot()

    assert report["after_restore_hooks"] == ["SnapStartHooks.after_restore"]
    assert report["hooks_ran"] == [["before_snapshot"]]  # before the snapshot point; not yet restored
    assert report["before_snapshot_hooks_left"] == []  # awslambdaric ran them all
    s3_port = seaweed.endpoint.rsplit(":", 1)[1]
    assert not [peer for peer in report["established_tcp"] if peer.endswith(":" + s3_port)], report
    assert "SnapStart: warmed up" in emulation.log()


def test_each_restored_environment_answers_health_and_generate(
    snapstart: tuple[SnapStartEmulation, list[LambdaEmulator]],
) -> None:
    _, restored = snapstart
    for function in restored:
        health = http_body(function.invoke(load_event("http-api-v2-health.json")))
        event = load_event("http-api-v2-generate.json")
        event["body"] = base64.b64encode(
            json.dumps({"prompt": "Hello", "max_new_tokens": 4, "temperature": 0}).encode()
        ).decode()
        event["isBase64Encoded"] = True
        answer = function.invoke(event)
        info = function.invoke({"path": "/model_info", "method": "GET"})["body"]

        assert health["status"] == "healthy"
        assert answer["statusCode"] == 200 and http_body(answer)["generated_text"][0].startswith("Hello")
        cold_start = info["cold_start"]
        assert cold_start["restored"] is True and 0 <= cold_start["restore_s"] < 10
        assert cold_start["warm_up_s"] is not None  # in the INIT, before the snapshot
        assert "restored from the snapshot" in function.log()


def test_restored_environments_sample_differently_without_a_seed(
    snapstart: tuple[SnapStartEmulation, list[LambdaEmulator]],
) -> None:
    _, (first, second) = snapstart

    texts = [sampled(first), sampled(second)]

    assert texts[0] != texts[1]  # one snapshot, but each environment reseeded after its restore


def test_a_seed_still_reproduces_across_restored_environments(
    snapstart: tuple[SnapStartEmulation, list[LambdaEmulator]],
) -> None:
    _, restored = snapstart
    body: dict[str, Any] = {"prompt": "Hello", "max_new_tokens": 12, "temperature": 1.0, "seed": 7}

    answers = [f.invoke({"path": "/generate", "method": "POST", "body": body})["body"] for f in restored]

    assert answers[0]["generated_text"] == answers[1]["generated_text"]
