"""LoRA adapters from S3 in the real Lambda Runtime Interface Emulator: an adapter as MODEL_PATH
over its base (both prefixes fetched at cold start), and named adapters chosen per request."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.adapters import peft_greedy_text
from tests.support.events import http_body, load_event
from tests.support.local_aws import LambdaEmulator, SeaweedFS
from tests.support.s3 import upload_model

pytestmark = pytest.mark.emulator
BUCKET = "weights"
BASE = f"s3://{BUCKET}/base/final_model/"
SQL = f"s3://{BUCKET}/adapters/sql/"
CHAT = f"s3://{BUCKET}/adapters/chat/"
PROMPT = "머신러닝을 설명하세요"
TOKENS = 10


@pytest.fixture(scope="module")
def seaweed(
    tmp_path_factory: pytest.TempPathFactory,
    demo_model_dir: Path,
    adapter_dir: Path,
    second_adapter_dir: Path,
) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    upload_model(client, BUCKET, "base/final_model/", demo_model_dir)
    upload_model(client, BUCKET, "adapters/sql/", adapter_dir)
    upload_model(client, BUCKET, "adapters/chat/", second_adapter_dir)
    yield server
    server.stop()


def start_function(seaweed: SeaweedFS, root: Path, **variables: str) -> LambdaEmulator:
    environment = {
        **seaweed.environment(),
        "MODEL_CACHE_DIR": str(root / "tmp"),
        "CPU_DTYPE": "float32",
        "HF_HOME": str(root / "hf"),
        "RESPONSE_CACHE_SIZE": "0",
        **variables,
    }
    return LambdaEmulator(environment, root / "rie.log").start()


def greedy(**extra: Any) -> dict[str, Any]:
    return {"prompt": PROMPT, "max_new_tokens": TOKENS, "temperature": 0, "repetition_penalty": 1.0, **extra}


def test_an_adapter_from_s3_cold_starts_over_its_base_from_s3(
    seaweed: SeaweedFS, tmp_path: Path, demo_model_dir: Path, adapter_dir: Path
) -> None:
    function = start_function(seaweed, tmp_path, MODEL_PATH=SQL, BASE_MODEL_PATH=BASE)
    try:
        info = function.invoke({"path": "/model_info", "method": "GET"})["body"]
        answer = function.invoke({"path": "/generate", "method": "POST", "body": greedy()})["body"]
    finally:
        function.stop()

    assert info["model_name"] == "sql" and info["base_model_path"] == BASE
    assert info["adapter"] == {"name": "sql", "merged": True}
    assert info["cold_start"]["fetch_bytes"] > 0
    expected = peft_greedy_text(demo_model_dir, {"a": adapter_dir}, PROMPT, TOKENS, merge=True)
    assert answer["generated_text"] == [PROMPT + expected]


def test_named_adapters_from_s3_are_chosen_per_event(
    seaweed: SeaweedFS, tmp_path: Path, demo_model_dir: Path, adapter_dir: Path, second_adapter_dir: Path
) -> None:
    adapters = {"sql": adapter_dir, "chat": second_adapter_dir}
    function = start_function(seaweed, tmp_path, MODEL_PATH=BASE, ADAPTERS=f"sql={SQL},chat={CHAT}")
    try:
        direct = {
            name: function.invoke({"path": "/generate", "method": "POST", "body": greedy(adapter=name)})
            for name in ("sql", "chat")
        }
        base = function.invoke({"path": "/generate", "method": "POST", "body": greedy()})
        event = load_event("http-api-v2-generate.json")
        event["body"] = base64.b64encode(json.dumps(greedy(adapter="chat")).encode()).decode()
        through_api = http_body(function.invoke(event))
        unknown = function.invoke({"path": "/generate", "method": "POST", "body": greedy(adapter="nope")})
        models = function.invoke({"path": "/v1/models", "method": "GET"})["body"]
    finally:
        function.stop()

    for name, response in direct.items():
        expected = peft_greedy_text(demo_model_dir, adapters, PROMPT, TOKENS, adapter=name)
        assert response["body"]["generated_text"] == [PROMPT + expected]
    expected_base = peft_greedy_text(demo_model_dir, adapters, PROMPT, TOKENS, adapter=None)
    assert base["body"]["generated_text"] == [PROMPT + expected_base]
    assert through_api["generated_text"] == direct["chat"]["body"]["generated_text"]
    assert unknown["statusCode"] == 422 and unknown["body"]["error"]["code"] == "unknown_adapter"
    assert [model["id"] for model in models["data"]] == ["final_model", "sql", "chat"]
