"""The Lambda handler in process: real Mangum, the real app, the demo model, the events/ samples."""

from __future__ import annotations

import base64
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from function.aws.lambda_handler import LambdaHandler, build_handler
from function.aws.limits import generation_budget, within_payload_limit
from function.config import Settings
from function.engine.engine import Engine
from tests.support.cases import CASE_IDS, CASES
from tests.support.events import assert_sample_answered, event_names, http_body, load_event
from tests.support.lambda_context import LambdaContext
from tests.support.settings import TEST_MAX_NEW_TOKENS, TEST_MAX_SEQUENCES, make_settings

LAMBDA_MAX_NEW_TOKENS = 1024  # the time-budget tests need long generations


@pytest.fixture(scope="module")
def lambda_settings(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    """The demo model with long generations allowed; not marked as on Lambda (as the environment the
    handler used to read was not)."""
    return make_settings(
        model_path=str(demo_model_dir),
        max_new_tokens=LAMBDA_MAX_NEW_TOKENS,
        max_num_return_sequences=TEST_MAX_SEQUENCES,
        model_cache_dir=tmp_path_factory.mktemp("cache"),
        allowed_model_paths=[tempfile.gettempdir()],
    )


@pytest.fixture(scope="module")
def lambda_engine(lambda_settings: Settings) -> Engine:
    engine = Engine(
        lambda_settings,
        startup_phases={"began": time.perf_counter(), "imports_s": 0.5, "rss_after_imports_mb": None},
    )
    engine.load_startup_model()
    return engine


@pytest.fixture(scope="module")
def handler(lambda_settings: Settings, lambda_engine: Engine) -> LambdaHandler:
    """The handler the Lambda entry point builds, over this module's own engine."""
    return build_handler(lambda_settings, lambda_engine)


@pytest.mark.parametrize("name", event_names())
def test_every_sample_event_is_answered(handler: LambdaHandler, name: str) -> None:
    assert_sample_answered(name, handler(load_event(name), LambdaContext()))


def test_direct_and_http_events_give_the_same_greedy_text(handler: LambdaHandler) -> None:
    direct = handler(load_event("direct-generate.json"), LambdaContext())["body"]
    http = http_body(handler(load_event("http-api-v2-generate.json"), LambdaContext()))

    assert direct["generated_text"] == http["generated_text"]


def test_direct_payload_with_query_parameters(
    handler: LambdaHandler, lambda_engine: Engine, lambda_settings: Settings, other_model_dir: Path
) -> None:
    event = {
        "path": "/load_model",
        "method": "POST",
        "query": {"model_path": str(other_model_dir), "load_in_8bit": "false"},
    }
    try:
        response = handler(event, LambdaContext())
        assert response["statusCode"] == 200 and response["body"]["model_name"] == "other_model"
    finally:
        lambda_engine.load(str(lambda_settings.model_path))


def test_cold_start_is_recorded_and_the_first_response_marked(handler: LambdaHandler) -> None:
    info = handler({"path": "/model_info", "method": "GET"}, LambdaContext())

    cold = info["body"]["cold_start"]
    assert cold["imports_s"] > 0 and cold["load_s"] > 0 and cold["fetch_s"] >= 0
    assert info["headers"]["x-cold-start"] in ("true", "false")
    later = handler({"path": "/health", "method": "GET"}, LambdaContext())
    assert later["headers"]["x-cold-start"] == "false"


def test_generation_stops_before_the_invocation_times_out(handler: LambdaHandler) -> None:
    event = {
        "path": "/generate",
        "method": "POST",
        "body": {"prompt": "Python", "max_new_tokens": 1000, "temperature": 0, "repetition_penalty": 1.0},
    }

    # GIVEN 1.6 s left: 0.1 s for generation after the safety margin
    started = time.monotonic()
    response = handler(event, LambdaContext(remaining_ms=1600))

    assert response["statusCode"] == 200
    assert response["body"]["finish_reason"] == ["time"]
    assert response["body"]["usage"]["completion_tokens"] < 1000
    assert time.monotonic() - started < 1.6


def test_generation_stops_before_api_gateways_29_seconds(handler: LambdaHandler) -> None:
    # GIVEN an HTTP API request that arrived 28 s ago, in a function with minutes left
    event = load_event("http-api-v2-generate.json")
    event["body"] = base64.b64encode(
        json.dumps(
            {"prompt": "Python", "max_new_tokens": 1000, "temperature": 0, "repetition_penalty": 1.0}
        ).encode()
    ).decode()
    event["requestContext"]["timeEpoch"] = int((time.time() - 28) * 1000)

    body = http_body(handler(event, LambdaContext(remaining_ms=600_000)))

    assert body["finish_reason"] == ["time"]


def test_budget_rules() -> None:
    url_event = {
        "requestContext": {
            "apiId": "x",
            "domainName": "abc.lambda-url.us-east-1.on.aws",
            "timeEpoch": int(time.time() * 1000),
        }
    }
    api_event = {"requestContext": {"apiId": "x", "timeEpoch": int(time.time() * 1000)}}

    assert generation_budget({}, None) is None
    assert generation_budget({}, LambdaContext(10_000)) == pytest.approx(8.5, abs=0.1)
    # no 29 s on Function URLs
    assert generation_budget(url_event, LambdaContext(300_000)) == pytest.approx(298.5, abs=0.1)
    assert generation_budget(api_event, LambdaContext(300_000)) == pytest.approx(27.5, abs=0.1)


def test_warmup_returns_at_once_without_generating(handler: LambdaHandler) -> None:
    started = time.perf_counter()
    response = handler({"warmup": True}, LambdaContext())

    assert response == {"warmup": True, "model_loaded": True}
    assert time.perf_counter() - started < 0.1


def test_unsupported_events_get_a_clear_400(handler: LambdaHandler) -> None:
    response = handler({"Records": [{"eventSource": "aws:sqs"}]}, LambdaContext())

    assert response["statusCode"] == 400
    assert "direct payload" in response["body"]["error"]["message"]


@pytest.mark.parametrize("event", [[], ["/generate"], "hello", None, 3, 2.5, True])
def test_events_that_are_not_objects_get_a_400_not_an_exception(handler: LambdaHandler, event: Any) -> None:
    response = handler(event, LambdaContext())

    assert response["statusCode"] == 400
    assert response["body"]["error"]["code"] == "unsupported_event"


def test_docs_behind_a_rest_api_stage_find_their_schema(handler: LambdaHandler) -> None:
    event = load_event("rest-v1-chat.json")
    event.update(httpMethod="GET", path="/docs", resource="/docs", body=None, isBase64Encoded=False)
    event["requestContext"].update(path="/prod/docs", resourcePath="/docs", httpMethod="GET")

    response = handler(event, LambdaContext())

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
    ids=CASE_IDS,
)
def test_the_bad_input_table_through_lambda_events(
    handler: LambdaHandler,
    transport: str,
    route: str,
    body: dict[str, Any],
    status: int,
    field: str | None,
    limit: Any,
) -> None:
    body, limit = for_lambda(body, limit)
    if transport == "direct":
        response = handler({"path": route, "method": "POST", "body": body}, LambdaContext())
        answer = response["body"]
    else:
        event = load_event("http-api-v2-generate.json")
        event["rawPath"] = event["requestContext"]["http"]["path"] = route
        event["body"] = base64.b64encode(json.dumps(body).encode()).decode()
        event["requestContext"]["timeEpoch"] = int(time.time() * 1000)
        response = handler(event, LambdaContext())
        answer = http_body(response)

    assert response["statusCode"] == status, answer
    if status != 200:
        detail = next(d for d in answer["error"]["details"] if d["field"] == field)
        if limit is not None:
            assert detail["limit"] == limit


def test_a_response_over_lambdas_6_mb_becomes_a_413() -> None:
    big = {
        "statusCode": 200,
        "headers": {},
        "body": json.dumps({"generated_text": ["x" * (7 * 1024 * 1024)]}),
    }
    small = {"statusCode": 200, "headers": {}, "body": "{}"}

    refused = within_payload_limit(big, path="/generate", direct=False)

    assert within_payload_limit(small, path="/generate", direct=False) is small
    assert refused["statusCode"] == 413
    assert json.loads(refused["body"])["error"]["code"] == "payload_too_large"
    assert len(json.dumps(refused)) < 1024


def test_a_6_mb_refusal_on_a_v1_route_is_openai_shaped() -> None:
    big = {"statusCode": 200, "headers": {}, "body": {"choices": [{"text": "x" * (7 * 1024 * 1024)}]}}

    refused = within_payload_limit(big, path="/v1/completions", direct=True)

    assert refused["statusCode"] == 413
    assert set(refused["body"]["error"]) == {"message", "type", "param", "code"}
    assert refused["body"]["error"]["code"] == "payload_too_large"


def test_streaming_through_lambda_is_a_clear_400(handler: LambdaHandler) -> None:
    event = {
        "path": "/v1/chat/completions",
        "method": "POST",
        "body": {"messages": [{"role": "user", "content": "hi"}], "stream": True},
    }

    response = handler(event, LambdaContext())

    assert response["statusCode"] == 400
    assert "server mode" in response["body"]["error"]["message"]
    assert response["body"]["error"]["param"] == "stream"


def test_openai_routes_answer_through_lambda(handler: LambdaHandler) -> None:
    event = {
        "path": "/v1/chat/completions",
        "method": "POST",
        "body": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    }

    response = handler(event, LambdaContext())

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
    handler: LambdaHandler, event: dict[str, Any], field: str
) -> None:
    response = handler(event, LambdaContext())

    assert response["statusCode"] == 400
    assert response["body"]["error"]["details"][0]["field"] == field


def test_a_direct_payload_with_a_json_string_body_and_no_headers_is_json(handler: LambdaHandler) -> None:
    # GIVEN the body as a JSON string, as `aws lambda invoke` users often write it, and no headers
    event = {
        "path": "/generate",
        "method": "POST",
        "body": json.dumps({"prompt": "Python", "max_new_tokens": 2}),
    }

    response = handler(event, LambdaContext())

    assert response["statusCode"] == 200, response["body"]
