"""The validation layer: every bound at its limit (accepted) and past it (422 naming field and limit)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.conftest import TEST_MAX_NEW_TOKENS, TEST_MAX_SEQUENCES

QUICK = {"max_new_tokens": 2}

# (route, body, expected status, field named in the error or None, limit or None)
CASES: list[tuple[str, dict[str, Any], int, str | None, Any]] = [
    # max_new_tokens: 1..MAX_NEW_TOKENS
    ("/generate", {"prompt": "a", "max_new_tokens": 1}, 200, None, None),
    ("/generate", {"prompt": "a", "max_new_tokens": 0}, 422, "max_new_tokens", 1),
    ("/generate", {"prompt": "a", "max_new_tokens": TEST_MAX_NEW_TOKENS}, 200, None, None),
    (
        "/generate",
        {"prompt": "a", "max_new_tokens": TEST_MAX_NEW_TOKENS + 1},
        422,
        "max_new_tokens",
        TEST_MAX_NEW_TOKENS,
    ),
    (
        "/chat",
        {"instruction": "a", "max_new_tokens": TEST_MAX_NEW_TOKENS + 1},
        422,
        "max_new_tokens",
        TEST_MAX_NEW_TOKENS,
    ),
    ("/chat", {"instruction": "a", "max_new_tokens": 0}, 422, "max_new_tokens", 1),
    # temperature >= 0, 0 is greedy
    ("/generate", {"prompt": "a", "temperature": 0, **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "temperature": -0.01, **QUICK}, 422, "temperature", 0),
    ("/chat", {"instruction": "a", "temperature": -1, **QUICK}, 422, "temperature", 0),
    # top_p in (0, 1]
    ("/generate", {"prompt": "a", "top_p": 1.0, **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "top_p": 1.01, **QUICK}, 422, "top_p", 1),
    ("/generate", {"prompt": "a", "top_p": 0.01, **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "top_p": 0, **QUICK}, 422, "top_p", 0),
    ("/chat", {"instruction": "a", "top_p": 1.5, **QUICK}, 422, "top_p", 1),
    # top_k >= 0
    ("/generate", {"prompt": "a", "top_k": 0, **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "top_k": -1, **QUICK}, 422, "top_k", 0),
    # repetition_penalty > 0
    ("/generate", {"prompt": "a", "repetition_penalty": 0.01, **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "repetition_penalty": 0, **QUICK}, 422, "repetition_penalty", 0),
    # num_return_sequences: 1..MAX_NUM_RETURN_SEQUENCES
    ("/generate", {"prompt": "a", "num_return_sequences": TEST_MAX_SEQUENCES, **QUICK}, 200, None, None),
    (
        "/generate",
        {"prompt": "a", "num_return_sequences": TEST_MAX_SEQUENCES + 1, **QUICK},
        422,
        "num_return_sequences",
        TEST_MAX_SEQUENCES,
    ),
    ("/generate", {"prompt": "a", "num_return_sequences": 0, **QUICK}, 422, "num_return_sequences", 1),
    # greedy with several sequences: identical copies (the schema can't express a cross-field rule)
    ("/generate", {"prompt": "a", "num_return_sequences": 2, "do_sample": False, **QUICK}, 200, None, None),
    # prompt / instruction not empty
    ("/generate", {"prompt": "", **QUICK}, 422, "prompt", 1),
    ("/generate", {"prompt": "  \n", **QUICK}, 422, "prompt", None),
    ("/generate", {**QUICK}, 422, "prompt", None),
    ("/chat", {"instruction": "", **QUICK}, 422, "instruction", 1),
    ("/chat", {"input": "only input", **QUICK}, 422, "instruction", None),
    # stop: up to 4 non-empty strings
    ("/generate", {"prompt": "a", "stop": ["1", "2", "3", "4"], **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "stop": ["1", "2", "3", "4", "5"], **QUICK}, 422, "stop", 4),
    ("/generate", {"prompt": "a", "stop": [""], **QUICK}, 422, "stop.0", 1),
    # seed >= 0
    ("/generate", {"prompt": "a", "seed": 0, **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "seed": -1, **QUICK}, 422, "seed", 0),
    # wrong types and unknown fields
    ("/generate", {"prompt": "a", "max_new_tokens": "many"}, 422, "max_new_tokens", None),
    ("/generate", {"prompt": "a", "max_tokens": 3}, 422, "max_tokens", None),
]


@pytest.mark.parametrize(
    ("route", "body", "status", "field", "limit"),
    CASES,
    ids=[f"{c[0]}-{c[3] or 'ok'}-{c[2]}-{i}" for i, c in enumerate(CASES)],
)
def test_bounds(
    client: TestClient, route: str, body: dict[str, Any], status: int, field: str | None, limit: Any
) -> None:
    # WHEN the request is sent
    response = client.post(route, json=body)

    # THEN it is accepted at the limit, and refused past it with the field and the limit named
    assert response.status_code == status, response.text
    if status == 200:
        return
    error = response.json()["error"]
    assert error["status"] == status
    assert error["code"] == "invalid_request"
    fields = [detail["field"] for detail in error["details"]]
    assert field in fields
    if limit is not None:
        detail = next(d for d in error["details"] if d["field"] == field)
        assert detail["limit"] == limit
    assert field in error["message"]


def test_context_overflow_is_413_naming_both_numbers_and_the_limit(client: TestClient) -> None:
    # GIVEN a prompt that nearly fills the demo model's 2048-token context
    prompt = "Python " * 2100

    # WHEN it asks for more new tokens than are left
    response = client.post("/generate", json={"prompt": prompt, "max_new_tokens": 2})

    # THEN 413 names the prompt's tokens, max_new_tokens and the context length
    assert response.status_code == 413
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "max_new_tokens is 2" in error["message"]
    assert "context length of 2048" in error["message"]
    assert error["details"][0]["limit"] == 2048


@pytest.mark.parametrize("raw", [b"{bad json", b'{"prompt": "a",}', b"\xff\xfe"])
def test_malformed_json_is_400(client: TestClient, raw: bytes) -> None:
    response = client.post("/generate", content=raw, headers={"Content-Type": "application/json"})

    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_json"


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"prompt"', b"null"])
def test_json_that_is_not_an_object_is_422(client: TestClient, raw: bytes) -> None:
    response = client.post("/generate", content=raw, headers={"Content-Type": "application/json"})

    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "body"


def test_default_max_new_tokens_is_capped_by_the_server_limit(client: TestClient) -> None:
    # GIVEN a server whose MAX_NEW_TOKENS (24) is below the guide's default (256)
    # WHEN a request leaves max_new_tokens out, THEN it is served with at most the limit
    response = client.post("/generate", json={"prompt": "a", "temperature": 0, "repetition_penalty": 1.0})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] <= TEST_MAX_NEW_TOKENS

    # but an explicit 256 is refused with the limit named
    explicit = client.post("/generate", json={"prompt": "a", "max_new_tokens": 256})
    assert explicit.status_code == 422
    assert explicit.json()["error"]["details"][0]["limit"] == TEST_MAX_NEW_TOKENS
