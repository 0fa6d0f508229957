"""Malformed Lambda events through the real handler: every one answered with a 4xx in the one error
shape (ours, or OpenAI's on /v1), never an exception that the runtime would turn into a stack trace."""

from __future__ import annotations

import base64
import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.types import Receive, Scope, Send

from function.aws import lambda_handler
from function.aws.lambda_handler import EventAdapter, LambdaHandler, build_handler
from function.aws.limits import generation_budget
from function.config import Settings
from function.engine.engine import Engine
from function.errors import MalformedEventError
from tests.support.events import event_names, http_body, load_event
from tests.support.lambda_context import LambdaContext
from tests.support.settings import make_settings


@pytest.fixture(scope="module")
def lambda_settings(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    return make_settings(
        model_path=str(demo_model_dir),
        model_cache_dir=tmp_path_factory.mktemp("cache"),
        allowed_model_paths=[tempfile.gettempdir()],
    )


@pytest.fixture(scope="module")
def handler(lambda_settings: Settings) -> LambdaHandler:
    """The handler the Lambda entry point builds, over the demo model."""
    engine = Engine(lambda_settings)
    engine.load_startup_model()
    return build_handler(lambda_settings, engine)


@pytest.fixture(scope="module")
def modelless_handler() -> LambdaHandler:
    """The real handler over an engine with no model: nothing an event asks for ever generates."""
    return build_handler(make_settings(), Engine(make_settings()))


def changed(name: str, change: Callable[[dict[str, Any]], Any]) -> Callable[[], Any]:
    """A sample event from events/, changed in place by `change` (whose result is ignored)."""

    def build() -> Any:
        event = load_event(name)
        change(event)
        return event

    return build


def answer(response: Any) -> dict[str, Any]:
    """The JSON body of a response: a direct payload's dict, or an HTTP event's (base64) JSON string."""
    assert isinstance(response, dict), response
    body = response["body"]
    parsed = body if isinstance(body, dict) else http_body(response)
    assert isinstance(parsed, dict), response
    return parsed


V2 = "http-api-v2-generate.json"
V1 = "rest-v1-chat.json"
ALB = "alb-chat.json"

# (id, event builder, the field the error must name; None where no single field is at fault). The kinds
# issue 15 lists: list, string, null and number events; an unknown requestContext; invalid base64 in
# v2, ALB and v1; a v1 dict body, list of headers, no httpMethod, list query parameters.
MALFORMED: list[tuple[str, Callable[[], Any], str | None]] = [
    ("list", lambda: ["/generate"], None),
    ("string", lambda: "hello", None),
    ("null", lambda: None, None),
    ("number", lambda: 3, None),
    ("request-context-empty", lambda: {"requestContext": {}}, "requestContext"),
    ("request-context-number", lambda: {"requestContext": 5}, "requestContext"),
    ("request-context-string", lambda: {"requestContext": "elb", "path": "/health"}, "requestContext"),
    (
        "request-context-neither-http-nor-method",
        lambda: {"requestContext": {"requestId": "x"}, "path": "/health", "headers": {}},
        "requestContext",
    ),
    ("v2-invalid-base64", changed(V2, lambda e: e.update(body="a")), "body"),
    ("alb-invalid-base64", changed(ALB, lambda e: e.update(body="a")), "body"),
    ("v1-invalid-base64", changed(V1, lambda e: e.update(body="a")), "body"),
    ("v1-non-ascii-base64", changed(V1, lambda e: e.update(body="정보")), "body"),
    (
        "v1-dict-body",
        changed(V1, lambda e: e.update(body={"instruction": "hi"}, isBase64Encoded=False)),
        "body",
    ),
    ("v1-dict-body-base64", changed(V1, lambda e: e.update(body={"instruction": "hi"})), "body"),
    ("v1-list-of-headers", changed(V1, lambda e: e.update(headers=[["Host", "example.com"]])), "headers"),
    ("v1-header-not-a-string", changed(V1, lambda e: e["headers"].update(Accept=5)), "headers.Accept"),
    (
        "v1-multi-value-headers-list",
        changed(V1, lambda e: e.update(multiValueHeaders=["a"])),
        "multiValueHeaders",
    ),
    (
        "v1-multi-value-header-not-a-list",
        changed(V1, lambda e: e["multiValueHeaders"].update(Accept="text/html")),
        "multiValueHeaders.Accept",
    ),
    (
        "v1-multi-value-header-of-numbers",
        changed(V1, lambda e: e["multiValueHeaders"].update(Accept=[1, 2])),
        "multiValueHeaders.Accept",
    ),
    ("v1-without-http-method", changed(V1, lambda e: e.pop("httpMethod")), "httpMethod"),
    ("v1-http-method-number", changed(V1, lambda e: e.update(httpMethod=7)), "httpMethod"),
    ("v1-without-path", changed(V1, lambda e: e.pop("path")), "path"),
    (
        "v1-query-parameters-list",
        changed(V1, lambda e: e.update(queryStringParameters=["a", "b"])),
        "queryStringParameters",
    ),
    (
        "v1-multi-value-query-not-lists",
        changed(V1, lambda e: e.update(multiValueQueryStringParameters={"a": "b"})),
        "multiValueQueryStringParameters.a",
    ),
    (
        "v1-identity-null",
        changed(V1, lambda e: e["requestContext"].update(identity=None)),
        "requestContext.identity",
    ),
    (
        "v1-is-base64-encoded-string",
        changed(V1, lambda e: e.update(isBase64Encoded="yes")),
        "isBase64Encoded",
    ),
    ("v1-bad-host-port", changed(V1, lambda e: e["multiValueHeaders"].update(Host=["h:x"])), "headers.host"),
    (
        "v1-ipv6-host",
        changed(V1, lambda e: e["multiValueHeaders"].update(Host=["[::1]:443"])),
        "headers.host",
    ),
    ("v2-without-http", changed(V2, lambda e: e["requestContext"].pop("http")), "requestContext.http"),
    (
        "v2-method-number",
        changed(V2, lambda e: e["requestContext"]["http"].update(method=1)),
        "requestContext.http.method",
    ),
    (
        "v2-without-source-ip",
        changed(V2, lambda e: e["requestContext"]["http"].pop("sourceIp")),
        "requestContext.http.sourceIp",
    ),
    ("v2-headers-null", changed(V2, lambda e: e.update(headers=None)), "headers"),
    ("v2-cookies-not-strings", changed(V2, lambda e: e.update(cookies=[1])), "cookies"),
    ("v2-raw-query-string-null", changed(V2, lambda e: e.update(rawQueryString=None)), "rawQueryString"),
    ("v2-body-number", changed(V2, lambda e: e.update(body=5, isBase64Encoded=False)), "body"),
    (
        "v2-forwarded-port-not-a-number",
        changed(V2, lambda e: e["headers"].update({"x-forwarded-port": "x"})),
        "headers.x-forwarded-port",
    ),
    (
        "v2-lone-surrogate-header",
        changed(V2, lambda e: e["headers"].update(accept="\ud800")),
        "headers.accept",
    ),
    ("alb-without-headers", changed(ALB, lambda e: e.pop("headers")), "headers"),
    (
        "alb-multi-value-headers-null",
        changed(ALB, lambda e: e.update(multiValueHeaders=None)),
        "multiValueHeaders",
    ),
    (
        "alb-query-value-number",
        changed(ALB, lambda e: e.update(queryStringParameters={"a": 5})),
        "queryStringParameters.a",
    ),
]


@pytest.mark.parametrize(
    ("build", "field"), [(b, f) for _, b, f in MALFORMED], ids=[i for i, _, _ in MALFORMED]
)
def test_a_malformed_event_gets_a_4xx_in_the_error_shape(
    handler: LambdaHandler, build: Callable[[], Any], field: str | None
) -> None:
    # GIVEN an event that is not what API Gateway, a Function URL or an ALB sends
    event = build()

    # WHEN the Lambda runtime hands it to the handler
    response = handler(event, LambdaContext())

    # THEN a 4xx in our error shape that names the field, not an exception
    error = answer(response)["error"]
    assert 400 <= response["statusCode"] < 500, response
    assert error["status"] == response["statusCode"]
    assert set(error) == {"code", "message", "status", "details"}
    assert error["code"] in ("malformed_event", "unsupported_event")
    if field is not None:
        assert error["details"][0]["field"] == field, error


def test_an_http_event_error_body_is_a_json_string_as_api_gateway_needs(handler: LambdaHandler) -> None:
    event = load_event(V2)
    event["body"] = "a"

    response = handler(event, LambdaContext())

    assert response["statusCode"] == 400
    assert isinstance(response["body"], str)
    assert response["headers"]["content-type"] == "application/json"
    assert json.loads(response["body"])["error"]["code"] == "malformed_event"


def test_a_malformed_event_on_a_v1_path_is_openai_shaped(handler: LambdaHandler) -> None:
    event = load_event(V2)
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/v1/chat/completions"
    event["body"] = "a"

    response = handler(event, LambdaContext())

    error = answer(response)["error"]
    assert response["statusCode"] == 400
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == "malformed_event" and error["param"] == "body"


@pytest.mark.parametrize(
    "epoch",
    [10**400, float("inf"), float("nan"), -(10**400), "soon", True],
    ids=["huge-int", "inf", "nan", "huge-negative", "string", "boolean"],
)
def test_an_absurd_request_time_is_ignored(epoch: Any) -> None:
    # GIVEN an API Gateway event whose arrival time is absurd (1e400 parses to inf, or a huge int)
    event = {"requestContext": {"apiId": "x", "timeEpoch": epoch}}

    # THEN the budget is API Gateway's full 29 s (less the margin), not an OverflowError
    assert generation_budget(event, LambdaContext(300_000)) == pytest.approx(27.5, abs=0.1)


@pytest.mark.parametrize("key", ["timeEpoch", "requestTimeEpoch"])
def test_an_event_with_an_absurd_request_time_is_answered(handler: LambdaHandler, key: str) -> None:
    event = load_event("http-api-v2-health.json")
    event["requestContext"][key] = 10**400

    response = handler(event, LambdaContext())

    assert response["statusCode"] == 200
    assert answer(response)["status"] == "healthy"


def test_a_request_context_that_is_not_an_object_gives_the_default_budget() -> None:
    assert generation_budget({"requestContext": 5}, LambdaContext(10_000)) == pytest.approx(8.5, abs=0.1)
    assert generation_budget({"requestContext": "apiId"}, None) is None


def test_a_recent_request_time_still_shortens_the_budget() -> None:
    event = {"requestContext": {"apiId": "x", "requestTimeEpoch": int((time.time() - 10) * 1000)}}

    assert generation_budget(event, LambdaContext(300_000)) == pytest.approx(17.5, abs=0.2)


def test_a_bug_in_the_app_is_still_a_500_not_a_malformed_event(lambda_settings: Settings) -> None:
    # GIVEN an engine whose status check is broken (a bug, not the event's fault)
    class BrokenEngine(Engine):
        def status(self) -> Any:
            raise KeyError("a bug")

    broken = build_handler(lambda_settings, BrokenEngine(lambda_settings))

    # WHEN a well-formed event reaches it
    response = broken(load_event("http-api-v2-health.json"), LambdaContext())

    # THEN a 500 in our shape
    assert response["statusCode"] == 500
    assert answer(response)["error"]["code"] == "internal_error"


async def app_that_must_not_run(scope: Scope, receive: Receive, send: Send) -> None:
    raise AssertionError("a malformed event reached the app")


def without_http_method() -> dict[str, Any]:
    event = load_event(V1)
    del event["httpMethod"]
    return event


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: {"requestContext": {}}, "requestContext"),  # Mangum: RuntimeError, no handler inferred
        (without_http_method, "httpMethod"),  # KeyError
        (changed(V2, lambda e: e.update(body="a")), None),  # binascii.Error
        (changed(V1, lambda e: e.update(headers=["a"])), None),  # AttributeError
        (changed(ALB, lambda e: e.update(queryStringParameters=[1])), None),  # AttributeError
    ],
    ids=["no-handler", "key-error", "base64", "list-of-headers", "list-of-parameters"],
)
def test_what_mangum_cannot_translate_is_a_malformed_event(
    build: Callable[[], Any], field: str | None
) -> None:
    # GIVEN the adapter alone, with no check in front of it
    adapter = EventAdapter(app_that_must_not_run, lifespan="off")
    context: Any = LambdaContext()

    # WHEN its translation of the event fails, THEN a MalformedEventError, before the app runs
    with pytest.raises(MalformedEventError) as raised:
        adapter(build(), context)
    assert raised.value.field == field


def test_the_last_resort_guard_answers_a_400(
    lambda_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a handler whose shape check lets everything through
    monkeypatch.setattr(lambda_handler, "check_http_event", lambda event: None)
    unchecked = build_handler(lambda_settings, Engine(make_settings()))

    # WHEN Mangum itself chokes on the event
    response = unchecked(without_http_method(), LambdaContext())

    # THEN the guard around its translation answers 400 malformed_event, naming the missing key
    error = answer(response)["error"]
    assert response["statusCode"] == 400
    assert error["code"] == "malformed_event" and error["details"][0]["field"] == "httpMethod"


# ---- fuzzing: the real sample events, mutated -------------------------------------------------------

JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.just(10**400)
    | st.floats()
    | st.text(max_size=12)
    | st.sampled_from(["", "/", "/health", "2.0", "GET", "a", "=", "h:x", "\ud800", "%ff", "[::1]:1"])
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)
EVENT_KEYS = [
    "requestContext", "version", "resource", "httpMethod", "path", "rawPath", "rawQueryString", "headers",
    "multiValueHeaders", "queryStringParameters", "multiValueQueryStringParameters", "body",
    "isBase64Encoded", "cookies", "method", "query", "warmup", "elb", "http", "identity", "sourceIp",
    "timeEpoch", "requestTimeEpoch", "stage", "host", "x-forwarded-port", "Host",
]  # fmt: skip
MAX_MUTATIONS = 4
MAX_DEPTH = 5


def mutate(data: st.DataObject, event: Any) -> Any:
    """One mutation at a random place in `event`: a key dropped or added, a value replaced with another
    JSON type, a random string or nested junk."""
    root: list[Any] = [event]
    parent: Any = root
    key: Any = 0
    for _ in range(MAX_DEPTH):
        node = parent[key]
        if not isinstance(node, dict | list) or not node or not data.draw(st.booleans()):
            break
        parent, key = (
            node,
            data.draw(st.sampled_from(list(node) if isinstance(node, dict) else range(len(node)))),
        )
    action = data.draw(st.sampled_from(["drop", "replace", "add"]))
    target = parent[key]
    if action == "drop" and isinstance(parent, dict):
        del parent[key]
    elif action == "add" and isinstance(target, dict):
        target[data.draw(st.sampled_from(EVENT_KEYS))] = data.draw(JSON_VALUES)
    else:
        parent[key] = data.draw(JSON_VALUES)
    return root[0]


def assert_answered(response: Any) -> None:
    """Never a 500 (nor any 5xx but the 503 of a missing model), every error in the error shape."""
    assert isinstance(response, dict), response
    if "warmup" in response:
        assert response == {"warmup": True, "model_loaded": False}
        return
    status = response["statusCode"]
    assert isinstance(status, int) and 200 <= status < 600, response
    assert status < 500 or status == 503, response
    body = response["body"] if isinstance(response["body"], dict) else http_body(response)
    if status < 400 or not body:  # a HEAD request's answer has no body
        return
    if status == 503 and "error" not in body:
        assert body["status"] != "healthy"  # /health without a model
        return
    assert isinstance(body["error"]["code"], str) and body["error"]["message"], response


@settings(
    max_examples=150,
    deadline=None,
    derandomize=True,  # CI runs the same examples every time; raise max_examples locally to explore
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(name=st.sampled_from(event_names()), data=st.data())
def test_mutated_sample_events_are_always_answered(
    modelless_handler: LambdaHandler, name: str, data: st.DataObject
) -> None:
    # GIVEN a real sample event with a few random mutations
    event: Any = copy.deepcopy(load_event(name))
    for _ in range(data.draw(st.integers(1, MAX_MUTATIONS))):
        event = mutate(data, event)

    # WHEN the handler gets it, THEN an answer (never an exception, never a 500)
    assert_answered(modelless_handler(event, LambdaContext()))


def test_base64_of_a_json_body_still_reaches_the_app(modelless_handler: LambdaHandler) -> None:
    # GIVEN a valid base64 body whose JSON is not what /generate wants
    event = load_event(V2)
    event["body"] = base64.b64encode(b"[1, 2]").decode()

    response = modelless_handler(event, LambdaContext())

    # THEN the app answers it (no model here: 503), not the event check
    assert response["statusCode"] in (422, 503)
