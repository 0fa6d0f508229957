"""Abuse and overload over HTTP (in-process): oversized stop strings and message lists, admission control
(503 with Retry-After past the limit, /health unaffected, places given back), and the OpenAI stream's
chunks (the model's name, `stream_options.include_usage`)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.engine.engine import Engine
from tests.support.settings import make_settings

PROMPT = "Python이란?"
MESSAGES = [{"role": "user", "content": "Python"}]


@pytest.fixture(scope="module")
def engine(demo_model_dir: Path) -> Engine:
    """Room for one generation request at a time; at most three chat messages; the default stop caps in
    characters (the cap in tokens, tested through the engine, out of the way)."""
    engine = Engine(
        make_settings(
            model_path=str(demo_model_dir), max_queued_requests=1, max_messages=3, max_stop_string_tokens=1000
        )
    )
    engine.load_startup_model()
    return engine


@pytest.fixture
def client(engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(engine.settings, engine)) as test_client:
        yield test_client
    assert engine.admitted == 0  # every request gave its place back, however it ended


def sse_payloads(text: str) -> list[Any]:
    """The JSON payloads of a server-sent event stream, then "[DONE]"."""
    items = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    return [item if item == "[DONE]" else json.loads(item) for item in items]


# Stop strings and messages.


def test_an_over_long_stop_string_is_a_422_naming_field_and_limit(client: TestClient) -> None:
    at_limit, over = "a" * 200, "a" * 201

    # GIVEN a stop string at the cap: accepted on each route
    assert client.post(
        "/generate", json={"prompt": PROMPT, "max_new_tokens": 2, "stop": [at_limit]}
    ).is_success
    assert client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stop": at_limit}
    ).is_success

    # WHEN one is a character over it
    ours = client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2, "stop": [over]})
    theirs = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stop": over})
    streamed = client.post("/v1/completions", json={"prompt": PROMPT, "stream": True, "stop": [over]})

    # THEN 422 in each route family's shape, naming the field and the limit; a stream fails before it starts
    assert ours.status_code == 422
    detail = ours.json()["error"]["details"][0]
    assert (detail["field"], detail["limit"]) == ("stop", 200)
    for response in (theirs, streamed):
        assert response.status_code == 422 and response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert (error["param"], error["code"]) == ("stop", "invalid_request") and "200" in error["message"]


def test_stop_strings_over_their_total_are_a_422(client: TestClient) -> None:
    response = client.post(
        "/chat", json={"instruction": "Python", "max_new_tokens": 2, "stop": ["a" * 200] * 3}
    )

    assert response.status_code == 422
    detail = response.json()["error"]["details"][0]
    assert (detail["field"], detail["limit"]) == ("stop", 400)


def test_too_many_chat_messages_are_a_422(client: TestClient) -> None:
    body = {"messages": MESSAGES * 3, "max_tokens": 2}
    assert client.post("/v1/chat/completions", json=body).is_success  # at the cap

    for stream in (False, True):
        response = client.post(
            "/v1/chat/completions", json={**body, "messages": MESSAGES * 4, "stream": stream}
        )

        assert response.status_code == 422
        error = response.json()["error"]
        assert error["param"] == "messages" and "3" in error["message"]


# Admission.


def test_past_the_limit_requests_get_503_with_retry_after_and_health_is_unaffected(
    client: TestClient, engine: Engine
) -> None:
    # GIVEN the one place taken (a request running or waiting)
    with engine.admit():
        # WHEN generation requests arrive, on every route, streamed or not
        refused = [
            client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2}),
            client.post("/chat", json={"instruction": PROMPT, "max_new_tokens": 2}),
            client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2}),
            client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "stream": True}),
            client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2}),
            client.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2, "stream": True}),
        ]
        health = client.get("/health")

    # THEN each is a 503 "overloaded" with Retry-After: 1, in its family's shape, and /health is 200
    for response in refused:
        assert response.status_code == 503 and response.headers["retry-after"] == "1"
        error = response.json()["error"]
        assert error["code"] == "overloaded" and "1" in error["message"]
    assert refused[0].json()["error"]["details"][0]["limit"] == 1
    assert refused[2].json()["error"]["type"] == "server_error"
    assert health.status_code == 200
    # AND with the place back, requests are admitted again
    assert client.post("/generate", json={"prompt": PROMPT, "max_new_tokens": 2}).is_success


def test_places_come_back_after_failures_and_streams(client: TestClient, engine: Engine) -> None:
    too_long = " ".join(["Python"] * 3000)  # past the demo model's context: the engine refuses it

    assert client.post("/generate", json={"prompt": too_long, "max_new_tokens": 2}).status_code == 413
    assert engine.admitted == 0
    streamed = client.post(
        "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "stream": True, "n": 2}
    )
    assert streamed.is_success and sse_payloads(streamed.text)[-1] == "[DONE]"
    assert engine.admitted == 0


# OpenAI stream chunks.


@pytest.fixture
def openai_client(client: TestClient) -> openai.OpenAI:
    """The official client, over the in-process app."""
    return openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=client, max_retries=0)


def test_every_stream_chunk_names_the_served_model(openai_client: openai.OpenAI) -> None:
    completions = openai_client.completions.create(model="anything", prompt=PROMPT, max_tokens=4, stream=True)
    models = {chunk.model for chunk in completions}
    chats = openai_client.chat.completions.create(
        model="anything", messages=[{"role": "user", "content": PROMPT}], max_tokens=4, stream=True
    )
    models |= {chunk.model for chunk in chats}

    assert models == {"final_model"}


def test_include_usage_adds_a_last_chunk_with_the_usage(
    openai_client: openai.OpenAI, client: TestClient
) -> None:
    # GIVEN the usage of the same request, not streamed
    body = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0, "n": 2}
    expected = client.post("/v1/completions", json=body).json()["usage"]

    # WHEN it is streamed with stream_options.include_usage
    chunks = list(
        openai_client.completions.create(
            model="final_model",
            prompt=PROMPT,
            max_tokens=5,
            temperature=0,
            n=2,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    # THEN the last chunk carries the usage and no choices; the others carry usage null
    *content, last = chunks
    assert last.choices == [] and last.usage is not None
    assert last.usage.model_dump(exclude_none=True) == expected
    assert all(chunk.usage is None and chunk.choices for chunk in content)


def test_without_include_usage_no_usage_chunk_is_sent(client: TestClient) -> None:
    body = {"messages": MESSAGES, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": False}}

    payloads = sse_payloads(client.post("/v1/chat/completions", json=body).text)

    assert payloads[-1] == "[DONE]"
    assert all(payload["choices"] and "usage" not in payload for payload in payloads[:-1])


def test_stream_chunks_name_the_adapter_a_request_chose(demo_model_dir: Path, adapter_dir: Path) -> None:
    # GIVEN a base with an adapter named "sql"
    settings = make_settings(model_path=str(demo_model_dir), adapters={"sql": str(adapter_dir)})
    engine = Engine(settings)
    engine.load_startup_model()
    with TestClient(create_app(settings, engine)) as client:
        # WHEN a stream chooses it by `model`, and another names something else
        def models(model: str) -> set[str]:
            body = {"model": model, "prompt": PROMPT, "max_tokens": 3, "stream": True}
            payloads = sse_payloads(client.post("/v1/completions", json=body).text)[:-1]
            return {payload["model"] for payload in payloads}

        # THEN every chunk names the adapter, or the base model
        assert models("sql") == {"sql"}
        assert models("gpt-4o-mini") == {"final_model"}
