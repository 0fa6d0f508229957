"""The Lambda handler in process: real Mangum, the real app, the demo model, the events/ samples."""

from __future__ import annotations

import base64
import importlib
import json
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from function import config, engine
from tests.conftest import TEST_MAX_NEW_TOKENS, TEST_MAX_SEQUENCES
from tests.events import assert_sample_answered, event_names, http_body, load_event
from tests.unit.test_schemas import CASES

LAMBDA_MAX_NEW_TOKENS = 1024  # the time-budget tests need long generations


class LambdaContext:
    """A stand-in for the runtime's context object: the fields the handler reads."""

    def __init__(self, remaining_ms: int = 60_000) -> None:
        self.deadline = time.monotonic() + remaining_ms / 1000
        self.aws_request_id = "test-request"
        self.function_name = "llm-function"
        self.memory_limit_in_mb = 3008
        self.invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:llm-function"

    def get_remaining_time_in_millis(self) -> int:
        return int((self.deadline - time.monotonic()) * 1000)


@pytest.fixture(scope="module")
def handler_module(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleType]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MODEL_PATH", str(demo_model_dir))
        patch.setenv("MAX_NEW_TOKENS", str(LAMBDA_MAX_NEW_TOKENS))
        patch.setenv("MAX_NUM_RETURN_SEQUENCES", str(TEST_MAX_SEQUENCES))
        patch.setenv("CPU_DTYPE", "float32")
        patch.setenv("MODEL_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        patch.setenv("ALLOWED_MODEL_PATHS", tempfile.gettempdir())
        config.get_settings.cache_clear()
        engine._engine = None
        module = importlib.reload(importlib.import_module("function.handler"))
        yield module
        config.get_settings.cache_clear()
        engine._engine = None


@pytest.mark.parametrize("name", event_names())
def test_every_sample_event_is_answered(handler_module: ModuleType, name: str) -> None:
    assert_sample_answered(name, handler_module.handler(load_event(name), LambdaContext()))


def test_direct_and_http_events_give_the_same_greedy_text(handler_module: ModuleType) -> None:
    direct = handler_module.handler(load_event("direct-generate.json"), LambdaContext())["body"]
    http = http_body(handler_module.handler(load_event("http-api-v2-generate.json"), LambdaContext()))

    assert direct["generated_text"] == http["generated_text"]


def test_direct_payload_with_query_parameters(handler_module: ModuleType, other_model_dir: Path) -> None:
    event = {
        "path": "/load_model",
        "method": "POST",
        "query": {"model_path": str(other_model_dir), "load_in_8bit": "false"},
    }
    try:
        response = handler_module.handler(event, LambdaContext())
        assert response["statusCode"] == 200 and response["body"]["model_name"] == "other_model"
    finally:
        handler_module.engine.load(handler_module.settings.model_path)


def test_cold_start_is_recorded_and_the_first_response_marked(handler_module: ModuleType) -> None:
    info = handler_module.handler({"path": "/model_info", "method": "GET"}, LambdaContext())

    cold = info["body"]["cold_start"]
    assert cold["imports_s"] > 0 and cold["load_s"] > 0 and cold["fetch_s"] >= 0
    assert info["headers"]["x-cold-start"] in ("true", "false")
    later = handler_module.handler({"path": "/health", "method": "GET"}, LambdaContext())
    assert later["headers"]["x-cold-start"] == "false"


def test_generation_stops_before_the_invocation_times_out(handler_module: ModuleType) -> None:
    event = {
        "path": "/generate",
        "method": "POST",
        "body": {"prompt": "Python", "max_new_tokens": 1000, "temperature": 0, "repetition_penalty": 1.0},
    }

    # GIVEN 1.6 s left: 0.1 s for generation after the safety margin
    started = time.monotonic()
    response = handler_module.handler(event, LambdaContext(remaining_ms=1600))

    assert response["statusCode"] == 200
    assert response["body"]["finish_reason"] == ["time"]
    assert response["body"]["usage"]["completion_tokens"] < 1000
    assert time.monotonic() - started < 1.6


def test_generation_stops_before_api_gateways_29_seconds(handler_module: ModuleType) -> None:
    # GIVEN an HTTP API request that arrived 28 s ago, in a function with minutes left
    event = load_event("http-api-v2-generate.json")
    event["body"] = base64.b64encode(
        json.dumps(
            {"prompt": "Python", "max_new_tokens": 1000, "temperature": 0, "repetition_penalty": 1.0}
        ).encode()
    ).decode()
    event["requestContext"]["timeEpoch"] = int((time.time() - 28) * 1000)

    body = http_body(handler_module.handler(event, LambdaContext(remaining_ms=600_000)))

    assert body["finish_reason"] == ["time"]


def test_budget_rules(handler_module: ModuleType) -> None:
    budget = handler_module.generation_budget
    url_event = {
        "requestContext": {
            "apiId": "x",
            "domainName": "abc.lambda-url.us-east-1.on.aws",
            "timeEpoch": int(time.time() * 1000),
        }
    }
    api_event = {"requestContext": {"apiId": "x", "timeEpoch": int(time.time() * 1000)}}

    assert budget({}, None) is None
    assert budget({}, LambdaContext(10_000)) == pytest.approx(8.5, abs=0.1)
    assert budget(url_event, LambdaContext(300_000)) == pytest.approx(298.5, abs=0.1)  # no 29 s on URLs
    assert budget(api_event, LambdaContext(300_000)) == pytest.approx(27.5, abs=0.1)


def test_warmup_returns_at_once_without_generating(handler_module: ModuleType) -> None:
    started = time.perf_counter()
    response = handler_module.handler({"warmup": True}, LambdaContext())

    assert response == {"warmup": True, "model_loaded": True}
    assert time.perf_counter() - started < 0.1


def test_unsupported_events_get_a_clear_400(handler_module: ModuleType) -> None:
    response = handler_module.handler({"Records": [{"eventSource": "aws:sqs"}]}, LambdaContext())

    assert response["statusCode"] == 400
    assert "direct payload" in response["body"]["error"]["message"]


def test_docs_behind_a_rest_api_stage_find_their_schema(handler_module: ModuleType) -> None:
    event = load_event("rest-v1-chat.json")
    event.update(httpMethod="GET", path="/docs", resource="/docs", body=None, isBase64Encoded=False)
    event["requestContext"].update(path="/prod/docs", resourcePath="/docs", httpMethod="GET")

    response = handler_module.handler(event, LambdaContext())

    assert response["statusCode"] == 200
    assert "/prod/openapi.json" in response["body"]


def for_lambda(body: dict[str, Any], limit: Any) -> tuple[dict[str, Any], Any]:
    """The validation table's max_new_tokens cases, moved to this fixture's MAX_NEW_TOKENS."""
    body = dict(body)
    if body.get("max_new_tokens") == TEST_MAX_NEW_TOKENS:
        body["max_new_tokens"] = LAMBDA_MAX_NEW_TOKENS
    elif body.get("max_new_tokens") == TEST_MAX_NEW_TOKENS + 1:
        body["max_new_tokens"], limit = LAMBDA_MAX_NEW_TOKENS + 1, LAMBDA_MAX_NEW_TOKENS
    return body, limit


@pytest.mark.parametrize("transport", ["direct", "http-api-v2"])
@pytest.mark.parametrize(
    ("route", "body", "status", "field", "limit"),
    CASES,
    ids=[f"{c[0]}-{c[3] or 'ok'}-{c[2]}-{i}" for i, c in enumerate(CASES)],
)
def test_the_bad_input_table_through_lambda_events(
    handler_module: ModuleType,
    transport: str,
    route: str,
    body: dict[str, Any],
    status: int,
    field: str | None,
    limit: Any,
) -> None:
    body, limit = for_lambda(body, limit)
    if transport == "direct":
        response = handler_module.handler({"path": route, "method": "POST", "body": body}, LambdaContext())
        answer = response["body"]
    else:
        event = load_event("http-api-v2-generate.json")
        event["rawPath"] = event["requestContext"]["http"]["path"] = route
        event["body"] = base64.b64encode(json.dumps(body).encode()).decode()
        event["requestContext"]["timeEpoch"] = int(time.time() * 1000)
        response = handler_module.handler(event, LambdaContext())
        answer = http_body(response)

    assert response["statusCode"] == status, answer
    if status != 200:
        detail = next(d for d in answer["error"]["details"] if d["field"] == field)
        if limit is not None:
            assert detail["limit"] == limit


def test_a_response_over_lambdas_6_mb_becomes_a_413(handler_module: ModuleType) -> None:
    big = {
        "statusCode": 200,
        "headers": {},
        "body": json.dumps({"generated_text": ["x" * (7 * 1024 * 1024)]}),
    }
    small = {"statusCode": 200, "headers": {}, "body": "{}"}

    refused = handler_module.within_payload_limit(big, direct=False)

    assert handler_module.within_payload_limit(small, direct=False) is small
    assert refused["statusCode"] == 413
    assert json.loads(refused["body"])["error"]["code"] == "payload_too_large"
    assert len(json.dumps(refused)) < 1024


def test_streaming_through_lambda_is_a_clear_400(handler_module: ModuleType) -> None:
    event = {
        "path": "/v1/chat/completions",
        "method": "POST",
        "body": {"messages": [{"role": "user", "content": "hi"}], "stream": True},
    }

    response = handler_module.handler(event, LambdaContext())

    assert response["statusCode"] == 400
    assert "server mode" in response["body"]["error"]["message"]
    assert response["body"]["error"]["param"] == "stream"


def test_openai_routes_answer_through_lambda(handler_module: ModuleType) -> None:
    event = {
        "path": "/v1/chat/completions",
        "method": "POST",
        "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    }

    response = handler_module.handler(event, LambdaContext())

    assert response["statusCode"] == 200
    assert response["body"]["object"] == "chat.completion"


@pytest.mark.parametrize(
    ("event", "field"),
    [
        ({"path": "/generate", "method": "POST", "headers": "x"}, "headers"),
        ({"path": "/load_model", "method": "POST", "query": ["model_path"]}, "query"),
        ({"path": "/health", "method": 7}, "method"),
    ],
)
def test_malformed_direct_payloads_get_a_400_naming_the_field(
    handler_module: ModuleType, event: dict[str, Any], field: str
) -> None:
    response = handler_module.handler(event, LambdaContext())

    assert response["statusCode"] == 400
    assert response["body"]["error"]["details"][0]["field"] == field
