"""The OpenAI-compatible routes with the official `openai` package as the client, plain and streaming."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from tests.support.servers import served

pytestmark = pytest.mark.server
KEY = "openai-compat-key-0123"


@pytest.fixture(scope="module")
def server(chat_model_dir: Path) -> Iterator[str]:
    with served(chat_model_dir, env={"API_KEYS": KEY, "RATE_LIMIT": ""}) as url:
        yield url


@pytest.fixture(scope="module")
def client(server: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0)


MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "머신러닝을 설명하세요"},
]


def test_models(client: openai.OpenAI) -> None:
    models = client.models.list()

    assert [model.id for model in models.data] == ["chat_model"]


def test_completions(client: openai.OpenAI, server: str) -> None:
    completion = client.completions.create(
        model="chat_model", prompt="Python이란?", max_tokens=8, temperature=0
    )
    generate = requests.post(
        f"{server}/generate",
        headers={"X-API-Key": KEY},
        timeout=60,
        json={"prompt": "Python이란?", "max_new_tokens": 8, "temperature": 0, "repetition_penalty": 1.0},
    ).json()

    assert completion.choices[0].text == generate["generated_text"][0][len("Python이란?") :]  # same engine
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_n_seed_and_stop(client: openai.OpenAI) -> None:
    first = client.completions.create(model="m", prompt="Python", max_tokens=8, n=2, seed=5, temperature=1.0)
    again = client.completions.create(model="m", prompt="Python", max_tokens=8, n=2, seed=5, temperature=1.0)
    full = client.completions.create(model="m", prompt="Python", max_tokens=12, temperature=0).choices[0].text
    stop = full[3:5]
    stopped = client.completions.create(model="m", prompt="Python", max_tokens=12, temperature=0, stop=[stop])

    assert len(first.choices) == 2 and [c.text for c in first.choices] == [c.text for c in again.choices]
    assert stopped.choices[0].text == full[: full.index(stop)] and stopped.choices[0].finish_reason == "stop"


def test_chat_completions_use_the_chat_template(client: openai.OpenAI) -> None:
    chat = client.chat.completions.create(model="chat_model", messages=MESSAGES, max_tokens=10, temperature=0)

    assert chat.choices[0].message.role == "assistant"
    assert isinstance(chat.choices[0].message.content, str)
    assert chat.usage is not None and chat.usage.prompt_tokens > 10  # the template wrapped the messages


def test_streaming_chat_adds_up_to_the_plain_answer(client: openai.OpenAI) -> None:
    plain = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16, temperature=0)
    stream = client.chat.completions.create(
        model="m", messages=MESSAGES, max_tokens=16, temperature=0, stream=True
    )

    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks)
    assert text.strip() == plain.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason


def test_streaming_completions_with_two_choices(client: openai.OpenAI) -> None:
    stream = client.completions.create(model="m", prompt="Python", max_tokens=6, n=2, seed=3, stream=True)
    plain = client.completions.create(model="m", prompt="Python", max_tokens=6, n=1, seed=3)

    texts: dict[int, str] = {}
    finished: dict[int, str | None] = {}
    for chunk in stream:
        choice = chunk.choices[0]
        texts[choice.index] = texts.get(choice.index, "") + choice.text
        if choice.finish_reason:
            finished[choice.index] = choice.finish_reason
    assert set(texts) == {0, 1} and set(finished) == {0, 1}
    assert texts[0] == plain.choices[0].text  # choice 0 streams with the request's seed


def test_errors_use_openais_shape(client: openai.OpenAI, server: str) -> None:
    with pytest.raises(openai.UnprocessableEntityError) as invalid:
        client.chat.completions.create(model="m", messages=MESSAGES, temperature=3)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()

    body = invalid.value.body
    assert (
        isinstance(body, dict) and body["type"] == "invalid_request_error" and body["param"] == "temperature"
    )


def test_a_bad_streaming_request_fails_before_the_stream_starts(client: openai.OpenAI) -> None:
    with pytest.raises(openai.APIStatusError) as too_long:
        client.completions.create(model="m", prompt="Python " * 3000, max_tokens=4, stream=True)

    assert too_long.value.status_code == 413
    body = too_long.value.body
    assert isinstance(body, dict) and body["code"] == "context_length_exceeded"
