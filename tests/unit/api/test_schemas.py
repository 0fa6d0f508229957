"""The validation layer: every bound at its limit (accepted) and past it (422 naming field and limit)."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from function.api.openai_schemas import (
    MAX_MESSAGES_HARD_CAP,
    MAX_MODEL_NAME_CHARS,
    ChatCompletionRequest,
    CompletionRequest,
)
from function.api.schemas import ChatRequest, GenerateRequest
from tests.support.cases import CASE_IDS, CASES
from tests.support.settings import TEST_MAX_NEW_TOKENS

REQUEST_MODELS = [GenerateRequest, ChatRequest, CompletionRequest, ChatCompletionRequest]


@pytest.mark.parametrize(
    ("route", "body", "status", "field", "limit"),
    CASES,
    ids=CASE_IDS,
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


def test_request_models_carry_the_guides_examples() -> None:
    # THEN every request model has an example, and the guide's keep its numbers
    for model in REQUEST_MODELS:
        examples = model.model_json_schema()["examples"]
        assert examples, model.__name__
        for example in examples:
            model.model_validate(example)
    assert GenerateRequest.model_json_schema()["examples"][0] == {
        "prompt": "Python이란 무엇인가요?",
        "max_new_tokens": 256,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
        "repetition_penalty": 1.1,
        "do_sample": True,
        "num_return_sequences": 1,
    }
    assert ChatRequest.model_json_schema()["examples"][0]["input"] == ""


def test_every_published_example_is_answered(client: TestClient) -> None:
    # GIVEN the request examples of /openapi.json ("Try it out" sends them), by route
    schema = client.get("/openapi.json").json()
    components = schema["components"]["schemas"]
    sent = set()
    for path, operations in schema["paths"].items():
        body = operations.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json")
        if body is None:
            continue
        name = body["schema"]["$ref"].rsplit("/", 1)[-1]
        for example in components[name].get("examples", []):
            # WHEN each is posted to this server (MAX_NEW_TOKENS 24)
            response = client.post(path, json=example)

            # THEN it is answered
            assert response.status_code == 200, (path, example, response.text)
            sent.add(name)

    assert sent == {model.__name__ for model in REQUEST_MODELS}


LONE_SURROGATE_BODIES = [  # raw bytes: the JSON escape "\ud800" without its pair
    ("/generate", b'{"prompt": "a\\ud800b", "max_new_tokens": 1}', "prompt"),
    ("/generate", b'{"prompt": "a", "stop": ["\\udfff"], "max_new_tokens": 1}', "stop.0"),
    ("/chat", b'{"instruction": "a\\ud800b", "max_new_tokens": 1}', "instruction"),
    ("/chat", b'{"instruction": "a", "input": "\\udc00", "max_new_tokens": 1}', "input"),
    ("/v1/completions", b'{"prompt": "a\\ud800b", "max_tokens": 1}', "prompt"),
    ("/v1/completions", b'{"prompt": "a", "stop": "\\ud800", "max_tokens": 1}', "stop"),
    ("/v1/completions", b'{"prompt": "a", "model": "m\\ud800", "max_tokens": 1}', "model"),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "a\\ud800b"}], "max_tokens": 1}',
        "messages.0.content",
    ),
]


@pytest.mark.parametrize(("route", "raw", "field"), LONE_SURROGATE_BODIES)
def test_a_lone_surrogate_is_a_422_naming_the_field(
    client: TestClient, route: str, raw: bytes, field: str
) -> None:
    # WHEN a text field carries half of a UTF-16 pair (no tokenizer takes it)
    response = client.post(route, content=raw, headers={"Content-Type": "application/json"})

    # THEN 422 names the field and says why, in the route family's shape
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    name = error["param"] if route.startswith("/v1/") else error["details"][0]["field"]
    assert name == field
    assert "lone surrogate" in error["message"]


def test_a_surrogate_pair_is_one_character_and_accepted() -> None:
    # "\ud83d\ude00" is one emoji: JSON decoding joins the pair, nothing is left alone
    request = ChatCompletionRequest.model_validate_json(
        b'{"messages": [{"role": "user", "content": "\\ud83d\\ude00"}], "model": "\\ud83d\\ude00"}'
    )
    assert request.messages[0].content == "\U0001f600" == request.model


def test_messages_and_model_names_have_static_caps(client: TestClient) -> None:
    # GIVEN the schema's ceilings: 4096 messages, 256 characters of model name
    message = {"role": "user", "content": "hi"}
    assert MAX_MESSAGES_HARD_CAP == 4096 and MAX_MODEL_NAME_CHARS == 256

    # THEN at each bound a request is valid
    at_cap = ChatCompletionRequest.model_validate(
        {"messages": [message] * MAX_MESSAGES_HARD_CAP, "model": "m" * MAX_MODEL_NAME_CHARS}
    )
    assert len(at_cap.messages) == MAX_MESSAGES_HARD_CAP

    # and past it the route refuses it with the field and the limit
    too_many = client.post("/v1/chat/completions", json={"messages": [message] * (MAX_MESSAGES_HARD_CAP + 1)})
    too_long = client.post(
        "/v1/completions", json={"prompt": "a", "model": "m" * (MAX_MODEL_NAME_CHARS + 1), "max_tokens": 1}
    )
    for response, field, limit in ((too_many, "messages", 4096), (too_long, "model", 256)):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["param"] == field
        assert str(limit) in response.json()["error"]["message"]


def test_openapi_states_max_messages(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]["ChatCompletionRequest"]

    assert schema["properties"]["messages"]["maxItems"] == client.app.state.settings.max_messages  # type: ignore[attr-defined]


def test_stream_options_is_openais_shape() -> None:
    request = CompletionRequest.model_validate(
        {"prompt": "a", "stream": True, "stream_options": {"include_usage": True}}
    )

    assert request.stream_options is not None and request.stream_options.include_usage is True
    assert CompletionRequest.model_validate({"prompt": "a"}).stream_options is None
    with pytest.raises(ValidationError):
        CompletionRequest.model_validate({"prompt": "a", "stream_options": {"include_usage": "yes"}})
