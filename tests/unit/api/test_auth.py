"""API keys: the route x key matrix, both header styles, and the open mode's warning.

(Keys read from Secrets Manager: tests/unit/aws/test_secrets.py.)
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from function.api.auth import key_matches
from function.api.factory import create_app
from function.engine.engine import Engine
from tests.support.settings import make_settings

USER, ADMIN, WRONG = "user-key-0123456789", "admin-key-9876543210", "not-a-key-000000000"
OPEN_ROUTES = [
    ("GET", "/health"),
    ("HEAD", "/health"),
    ("GET", "/docs"),
    ("GET", "/redoc"),
    ("GET", "/docs/assets/swagger-ui-bundle.js"),
    ("GET", "/openapi.json"),
]
USER_ROUTES = [("POST", "/generate"), ("POST", "/chat"), ("GET", "/model_info")]


@pytest.fixture(scope="module")
def guarded(demo_model_dir: Path) -> Iterator[TestClient]:
    settings = make_settings(model_path=str(demo_model_dir), api_keys=[USER], admin_api_keys=[ADMIN])
    engine = Engine(settings)
    engine.load_startup_model()
    with TestClient(create_app(settings, engine)) as client:
        yield client


def call(client: TestClient, method: str, path: str, key: str | None, style: str, demo: Path) -> Any:
    headers = {}
    if key is not None:
        headers = {"X-API-Key": key} if style == "x-api-key" else {"Authorization": f"Bearer {key}"}
    body = {
        "/generate": {"prompt": "Python", "max_new_tokens": 2},
        "/chat": {"instruction": "hi", "max_new_tokens": 2},
    }
    params = {"model_path": str(demo)} if path == "/load_model" else None
    return client.request(method, path, headers=headers, json=body.get(path), params=params)


EXPECTED = {  # key -> (status on user routes, status on /load_model)
    None: (401, 401),
    WRONG: (401, 401),
    USER: (200, 403),
    ADMIN: (200, 200),
}


@pytest.mark.parametrize("style", ["x-api-key", "bearer"])
@pytest.mark.parametrize(
    "key", [None, WRONG, USER, ADMIN], ids=["no-key", "wrong-key", "user-key", "admin-key"]
)
def test_route_key_matrix(guarded: TestClient, demo_model_dir: Path, key: str | None, style: str) -> None:
    user_status, admin_status = EXPECTED[key]

    for method, path in OPEN_ROUTES:
        assert call(guarded, method, path, key, style, demo_model_dir).status_code == 200, path
    for method, path in USER_ROUTES:
        response = call(guarded, method, path, key, style, demo_model_dir)
        assert response.status_code == user_status, (path, response.text)
    response = call(guarded, "POST", "/load_model", key, style, demo_model_dir)
    assert response.status_code == admin_status, response.text
    if admin_status != 200:
        body = response.json()
        assert body["error"]["code"] == ("forbidden" if admin_status == 403 else "unauthorized")
        for secret in (USER, ADMIN, WRONG):
            assert secret not in response.text
    if user_status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_unauthenticated_requests_learn_nothing_about_the_body(guarded: TestClient) -> None:
    response = guarded.post("/generate", json={"prompt": "", "top_p": 7})

    assert response.status_code == 401


def test_only_user_keys_means_no_runtime_loading(demo_model_dir: Path) -> None:
    settings = make_settings(model_path=str(demo_model_dir), api_keys=[USER])
    client = TestClient(create_app(settings, Engine(settings)))

    response = client.post(
        "/load_model", params={"model_path": str(demo_model_dir)}, headers={"X-API-Key": USER}
    )

    assert response.status_code == 403
    assert "ADMIN_API_KEYS is not set" in response.json()["error"]["message"]


def test_open_without_keys_and_warns_once(demo_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    settings = make_settings(model_path=str(demo_model_dir))
    with caplog.at_level(logging.WARNING, logger="function.api.auth"):
        client = TestClient(create_app(settings, Engine(settings)))
        client.get("/model_info")
        client.get("/model_info")

    warnings = [r for r in caplog.records if "every route is open" in r.message]
    assert len(warnings) == 1
    assert client.post("/generate", json={"prompt": "x", "max_new_tokens": 1}).status_code != 401


def test_key_comparison() -> None:
    assert key_matches("abc", ["x", "abc"])
    assert not key_matches("ab", ["abc"])
    assert not key_matches("abc", [])


UNREADABLE_BODIES = [  # bodies FastAPI fails on (the first two while reading them, before the key check)
    (b"{not json", "application/json", 400),
    (b'{"prompt": "caf\xe9"}', "application/json", 400),
    (b'{"prompt": "hi"}', "application/x-www-form-urlencoded", 415),
]


@pytest.mark.parametrize("route", ["/generate", "/chat", "/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize(
    ("raw", "content_type", "_status"), UNREADABLE_BODIES, ids=["malformed", "latin-1", "form"]
)
@pytest.mark.parametrize("key", [None, WRONG], ids=["no-key", "wrong-key"])
def test_the_key_is_checked_before_the_body(
    guarded: TestClient, route: str, raw: bytes, content_type: str, _status: int, key: str | None
) -> None:
    # GIVEN a request whose body cannot be read as JSON, without a valid key
    headers = {"Content-Type": content_type} | ({"X-API-Key": key} if key else {})

    # WHEN it is sent
    response = guarded.post(route, content=raw, headers=headers)

    # THEN it gets the 401, not the body's error
    assert response.status_code == 401, response.text
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    ("raw", "content_type", "status"), UNREADABLE_BODIES, ids=["malformed", "latin-1", "form"]
)
def test_with_a_valid_key_the_body_error_is_answered(
    guarded: TestClient, raw: bytes, content_type: str, status: int
) -> None:
    response = guarded.post(
        "/generate", content=raw, headers={"Content-Type": content_type, "X-API-Key": USER}
    )

    assert response.status_code == status, response.text


def test_a_wrong_key_with_a_malformed_body_counts_against_the_rate_limit(demo_model_dir: Path) -> None:
    # GIVEN a rate limit of 2 a minute, and clients guessing keys with bodies that cannot be parsed
    settings = make_settings(model_path=str(demo_model_dir), api_keys=[USER], rate_limit="2/minute")
    client = TestClient(create_app(settings, Engine(settings)))
    headers = {"Content-Type": "application/json", "X-API-Key": WRONG}

    # WHEN one client guesses three times
    statuses = [client.post("/generate", content=b"{", headers=headers).status_code for _ in range(3)]

    # THEN the guesses are counted against its address, as with a well-formed body
    assert statuses == [401, 401, 429]
