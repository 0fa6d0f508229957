"""Error bodies: OpenAI's shape on every /v1/… route, ours on the others, and nothing private in either."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.config import Settings
from function.engine.engine import Engine
from tests.support.settings import make_settings

OPENAI_ERROR_KEYS = {"message", "type", "param", "code"}
OUR_ERROR_KEYS = {"code", "message", "status", "details"}
BODY_LIMIT = 1024  # the smallest MAX_REQUEST_BYTES allowed
KEY = "errors-user-key-0123456789"
LONG = "a" * (2 * BODY_LIMIT)
OVERSIZED_V1 = [
    ("/v1/completions", {"model": "m", "prompt": LONG, "max_tokens": 1}),
    (
        "/v1/chat/completions",
        {"model": "m", "messages": [{"role": "user", "content": LONG}], "max_tokens": 1},
    ),
]


def openai_error(response: Any, status: int) -> dict[str, Any]:
    """The error of an OpenAI-shaped error response: `{"error": {"message", "type", "param", "code"}}`."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == OPENAI_ERROR_KEYS, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and isinstance(error["code"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    return error


def our_error(response: Any, status: int) -> dict[str, Any]:
    """The error of one of our error responses: `{"error": {"code", "message", "status", "details"}}`."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == OUR_ERROR_KEYS, error
    assert error["status"] == status
    return error


@pytest.fixture
def small_body_client(settings_factory: Callable[..., Settings], served_engine: Engine) -> TestClient:
    """The served demo model behind an app that takes request bodies of at most 1024 bytes."""
    settings = settings_factory(model_path=served_engine.settings.model_path, max_request_bytes=BODY_LIMIT)
    return TestClient(create_app(settings, served_engine))


@pytest.mark.parametrize(("route", "body"), OVERSIZED_V1, ids=[route for route, _ in OVERSIZED_V1])
def test_a_body_over_the_limit_on_v1_is_openai_shaped(
    small_body_client: TestClient, route: str, body: dict[str, Any]
) -> None:
    # GIVEN a body over MAX_REQUEST_BYTES for an OpenAI-compatible route
    content = json.dumps(body)
    assert len(content) > BODY_LIMIT

    # WHEN it is posted
    response = small_body_client.post(route, content=content, headers={"Content-Type": "application/json"})

    # THEN the 413 is in OpenAI's shape, naming the limit
    error = openai_error(response, 413)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "payload_too_large"
    assert str(BODY_LIMIT) in error["message"]


def test_a_streamed_body_over_the_limit_on_v1_is_openai_shaped(small_body_client: TestClient) -> None:
    # GIVEN a body without Content-Length (counted while it streams in), over the limit
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "prompt": "'
        for _ in range(10):
            yield b"a" * 500
        yield b'"}'

    # WHEN it is posted to /v1/completions
    response = small_body_client.post(
        "/v1/completions", content=chunks(), headers={"Content-Type": "application/json"}
    )

    # THEN the 413 is in OpenAI's shape too
    error = openai_error(response, 413)
    assert error["code"] == "payload_too_large"


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("/generate", {"prompt": LONG, "max_new_tokens": 1}),
        ("/chat", {"instruction": LONG, "max_new_tokens": 1}),
    ],
)
def test_a_body_over_the_limit_on_our_routes_is_in_our_shape(
    small_body_client: TestClient, route: str, body: dict[str, Any]
) -> None:
    # WHEN a body over MAX_REQUEST_BYTES is posted to one of the guide's routes
    response = small_body_client.post(
        route, content=json.dumps(body), headers={"Content-Type": "application/json"}
    )

    # THEN the 413 is in our shape, the field and the limit in its details
    error = our_error(response, 413)
    assert error["code"] == "payload_too_large"
    assert error["details"][0] == {"field": "body", "message": "request body too large", "limit": BODY_LIMIT}


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/v1/nope", 404, "not_found"),
        ("POST", "/v1/chat/nope", 404, "not_found"),
        ("GET", "/v1/completions", 405, "method_not_allowed"),
    ],
)
def test_unknown_routes_and_methods_under_v1_are_openai_shaped(
    client: TestClient, method: str, path: str, status: int, code: str
) -> None:
    response = client.request(method, path)

    error = openai_error(response, status)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == code


@pytest.mark.parametrize(
    ("route", "body", "param"),
    [
        ("/v1/completions", {"prompt": "a", "temperature": 3}, "temperature"),
        ("/v1/completions", {"prompt": "", "max_tokens": 1}, "prompt"),
        ("/v1/completions", {"max_tokens": 1}, "prompt"),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 1}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_p": 0}, "top_p"),
    ],
)
def test_a_validation_error_under_v1_is_an_openai_422_naming_the_param(
    client: TestClient, route: str, body: dict[str, Any], param: str
) -> None:
    response = client.post(route, json=body)

    error = openai_error(response, 422)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_request"
    assert error["param"] == param


def test_malformed_json_under_v1_is_an_openai_400(client: TestClient) -> None:
    response = client.post(
        "/v1/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )

    error = openai_error(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["code"] == "invalid_json"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
def test_a_prompt_over_the_context_under_v1_is_an_openai_413(client: TestClient, stream: bool) -> None:
    response = client.post(
        "/v1/completions", json={"prompt": "Python " * 2100, "max_tokens": 2, "stream": stream}
    )

    error = openai_error(response, 413)
    assert error["code"] == "context_length_exceeded"


def test_missing_and_wrong_keys_under_v1_are_openai_401s(
    settings_factory: Callable[..., Settings], served_engine: Engine
) -> None:
    settings = settings_factory(model_path=served_engine.settings.model_path, api_keys=[KEY])
    client = TestClient(create_app(settings, served_engine))

    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        response = client.get("/v1/models", headers=headers)

        error = openai_error(response, 401)
        assert error["type"] == "authentication_error"
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_the_rate_limit_under_v1_is_an_openai_429_with_retry_after(
    settings_factory: Callable[..., Settings], served_engine: Engine
) -> None:
    settings = settings_factory(model_path=served_engine.settings.model_path, rate_limit="1/minute")
    client = TestClient(create_app(settings, served_engine))

    assert client.get("/v1/models").status_code == 200
    response = client.get("/v1/models")

    error = openai_error(response, 429)
    assert error["type"] == "rate_limit_error"
    assert error["code"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 60


def test_no_model_under_v1_is_an_openai_503_with_retry_after(
    settings_factory: Callable[..., Settings], tmp_path: Path
) -> None:
    # GIVEN a start-up model that does not exist
    engine = Engine(settings_factory(model_path=str(tmp_path / "no-such-model")))
    engine.load_startup_model()
    client = TestClient(create_app(engine.settings, engine))

    for response in (
        client.get("/v1/models"),
        client.post("/v1/completions", json={"prompt": "a", "max_tokens": 1}),
        client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "a"}]}),
    ):
        error = openai_error(response, 503)
        assert error["code"] == "model_not_loaded"
        assert response.headers["Retry-After"]
        assert str(tmp_path) not in response.text


@pytest.fixture
def s3(moto_s3: Any) -> Any:
    return moto_s3


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
    engine = Engine(settings)
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


JSON_ROUTES = [
    ("/generate", {"prompt": "hi", "max_new_tokens": 1}),
    ("/chat", {"instruction": "hi", "max_new_tokens": 1}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 1}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
]


def family_error(response: Any, status: int, path: str) -> dict[str, Any]:
    return openai_error(response, status) if path.startswith("/v1/") else our_error(response, status)


@pytest.mark.parametrize("route", [route for route, _ in JSON_ROUTES])
@pytest.mark.parametrize(
    "raw",
    [b'{"prompt": "caf\xe9"}', b"\xff\xfe\x00", b'{"prompt": "\xc3"}'],
    ids=["latin-1", "garbage", "cut-sequence"],
)
def test_a_body_that_is_not_utf8_is_a_400_invalid_json(client: TestClient, route: str, raw: bytes) -> None:
    # WHEN the body's bytes are not UTF-8 (here: Latin-1 "café", or no text at all)
    response = client.post(route, content=raw, headers={"Content-Type": "application/json"})

    # THEN it is the documented invalid_json, saying the body must be UTF-8 JSON
    error = family_error(response, 400, route)
    assert error["code"] == "invalid_json"
    assert "UTF-8 JSON" in error["message"]


def test_json_nested_too_deeply_is_a_400_invalid_json(client: TestClient) -> None:
    response = client.post("/generate", content=b"[" * 100_000, headers={"Content-Type": "application/json"})

    error = our_error(response, 400)
    assert error["code"] == "invalid_json"
    assert "nested too deeply" in error["message"]


@pytest.mark.parametrize(("route", "body"), JSON_ROUTES)
@pytest.mark.parametrize("content_type", ["application/x-www-form-urlencoded", "text/plain", None])
def test_a_json_body_without_its_content_type_is_a_415_saying_what_to_send(
    client: TestClient, route: str, body: dict[str, Any], content_type: str | None
) -> None:
    # GIVEN a valid JSON body sent as `curl -d` sends it (form-urlencoded), as text, or without a type
    headers = {"Content-Type": content_type} if content_type else {}

    # WHEN it is posted
    response = client.post(route, content=json.dumps(body).encode(), headers=headers)

    # THEN 415 tells the caller which Content-Type to send
    error = family_error(response, 415, route)
    assert error["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in error["message"]


@pytest.mark.parametrize("content_type", ["application/json; charset=utf-8", "application/vnd.api+json"])
def test_json_content_types_with_parameters_or_suffixes_are_json(
    client: TestClient, content_type: str
) -> None:
    # an invalid field: 422 shows the body was read as JSON, without generating anything
    response = client.post("/generate", content=b'{"prompt": ""}', headers={"Content-Type": content_type})

    assert our_error(response, 422)["details"][0]["field"] == "prompt"
