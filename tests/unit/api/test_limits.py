"""Caps: request headers and body, prompt tokens, the Lambda response size, and the per-key rate limit."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.engine.engine import Engine
from tests.support.settings import make_settings


def client_for(demo_model_dir: Path, **overrides: object) -> TestClient:
    settings = make_settings(model_path=str(demo_model_dir), **overrides)
    engine = Engine(settings)
    engine.load_startup_model()
    return TestClient(create_app(settings, engine))


def test_body_over_the_cap_is_413(demo_model_dir: Path) -> None:
    client = client_for(demo_model_dir, max_request_bytes=2048)
    at_cap = json.dumps({"prompt": "a" * 1990, "max_new_tokens": 1})
    assert len(at_cap) <= 2048

    assert (
        client.post("/generate", content=at_cap, headers={"Content-Type": "application/json"}).status_code
        == 200
    )
    over = client.post(
        "/generate", content=json.dumps({"prompt": "a" * 2100}), headers={"Content-Type": "application/json"}
    )
    assert over.status_code == 413
    assert over.json()["error"]["details"][0] == {
        "field": "body",
        "message": "request body too large",
        "limit": 2048,
    }


def test_a_streamed_body_without_length_is_counted(demo_model_dir: Path) -> None:
    client = client_for(demo_model_dir, max_request_bytes=2048)

    def chunks() -> Iterator[bytes]:
        yield b'{"prompt": "'
        for _ in range(10):
            yield b"a" * 500
        yield b'"}'

    response = client.post("/generate", content=chunks(), headers={"Content-Type": "application/json"})

    assert response.status_code == 413


def test_prompt_token_cap(demo_model_dir: Path) -> None:
    client = client_for(demo_model_dir, max_prompt_tokens=5)

    assert client.post("/generate", json={"prompt": "Python", "max_new_tokens": 1}).status_code == 200
    response = client.post("/generate", json={"prompt": "Python " * 20, "max_new_tokens": 1})
    assert response.status_code == 413
    detail = response.json()["error"]["details"][0]
    assert detail["field"] == "prompt" and detail["limit"] == 5


def test_rate_limit_per_key_with_retry_after(demo_model_dir: Path) -> None:
    client = client_for(demo_model_dir, rate_limit="3/minute", api_keys=["key-a", "key-b"])
    body = {"prompt": "x", "max_new_tokens": 1}

    statuses = [
        client.post("/generate", json=body, headers={"X-API-Key": "key-a"}).status_code for _ in range(4)
    ]
    limited = client.post("/generate", json=body, headers={"X-API-Key": "key-a"})

    assert statuses == [200, 200, 200, 429]
    assert limited.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(limited.headers["Retry-After"]) <= 60
    assert (
        client.post("/generate", json=body, headers={"X-API-Key": "key-b"}).status_code == 200
    )  # its own window
    assert all(client.get("/health").status_code == 200 for _ in range(5))  # probes are never limited


def test_wrong_keys_are_rate_limited_by_client_address(demo_model_dir: Path) -> None:
    client = client_for(demo_model_dir, rate_limit="2/minute", api_keys=["right-key"])

    statuses = [client.get("/model_info", headers={"X-API-Key": f"guess-{i}"}).status_code for i in range(3)]

    assert statuses == [401, 401, 429]


def test_rate_limit_by_client_address_when_open(demo_model_dir: Path) -> None:
    client = client_for(demo_model_dir, rate_limit="2/minute")

    statuses = [client.get("/model_info").status_code for _ in range(3)]

    assert statuses == [200, 200, 429]


def test_no_rate_limiter_on_lambda(demo_model_dir: Path) -> None:
    client = client_for(demo_model_dir, rate_limit="1/minute", aws_lambda_function_name="fn")

    assert [client.get("/model_info").status_code for _ in range(3)] == [200, 200, 200]


@pytest.mark.parametrize("route", ["/generate", "/chat"])
def test_openapi_states_the_servers_limits(demo_model_dir: Path, route: str) -> None:
    client = client_for(demo_model_dir, max_new_tokens=77, max_num_return_sequences=2)
    schemas = client.get("/openapi.json").json()["components"]["schemas"]

    model = "GenerateRequest" if route == "/generate" else "ChatRequest"
    assert schemas[model]["properties"]["max_new_tokens"]["maximum"] == 77
    if route == "/generate":
        assert schemas[model]["properties"]["num_return_sequences"]["maximum"] == 2


def test_openapi_examples_are_lowered_to_the_servers_limits(demo_model_dir: Path) -> None:
    # GIVEN a server whose limits are below the guide's example (max_new_tokens 256)
    client = client_for(demo_model_dir, max_new_tokens=77)

    # WHEN the docs' examples are read
    schemas = client.get("/openapi.json").json()["components"]["schemas"]

    # THEN each bounded number is at most the limit, and the fields keep their order (prompt first)
    generate = schemas["GenerateRequest"]["examples"]
    assert [example["max_new_tokens"] for example in generate] == [77, 77]
    assert next(iter(generate[0])) == "prompt"
    chat_curl = {"instruction": "머신러닝을 설명하세요", "max_new_tokens": 77}
    assert schemas["ChatRequest"]["examples"][1] == chat_curl
    assert schemas["CompletionRequest"]["examples"][0]["max_tokens"] == 64  # under the limit: kept


HEADER_LIMIT = 2048


def header_bytes(client: TestClient, method: str, path: str, headers: dict[str, str]) -> int:
    """What HeaderSizeLimit counts for this request: its header names and values, client defaults too."""
    request = client.build_request(method, path, headers=headers)
    return sum(len(name) + len(value) for name, value in request.headers.raw)


@pytest.mark.parametrize("path", ["/health", "/v1/models"])
def test_headers_over_the_cap_are_431(served_engine: Engine, path: str) -> None:
    # GIVEN a server whose MAX_HEADER_BYTES is 2048
    settings = make_settings(model_path=served_engine.settings.model_path, max_header_bytes=HEADER_LIMIT)
    client = TestClient(create_app(settings, served_engine))
    padding = HEADER_LIMIT - header_bytes(client, "GET", path, {"X-Pad": ""})

    # WHEN a request's headers total exactly the cap, and one byte more
    at_cap = client.get(path, headers={"X-Pad": "p" * padding})
    over = client.get(path, headers={"X-Pad": "p" * (padding + 1)})

    # THEN the first is served and the second refused with the limit named, in the route family's shape
    assert header_bytes(client, "GET", path, {"X-Pad": "p" * padding}) == HEADER_LIMIT
    assert at_cap.status_code == 200, at_cap.text
    assert over.status_code == 431
    error = over.json()["error"]
    assert error["code"] == "headers_too_large"
    assert str(HEADER_LIMIT) in error["message"]
    if path.startswith("/v1/"):
        assert error["param"] == "headers"
    else:
        assert error["details"] == [
            {"field": "headers", "message": "request headers too large", "limit": 2048}
        ]


def test_many_small_headers_count_together(served_engine: Engine) -> None:
    settings = make_settings(model_path=served_engine.settings.model_path, max_header_bytes=HEADER_LIMIT)
    client = TestClient(create_app(settings, served_engine))

    response = client.get("/health", headers={f"X-Pad-{i}": "p" * 100 for i in range(30)})

    assert response.status_code == 431
