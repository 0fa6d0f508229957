"""Adapters over HTTP: `adapter` on the guide's routes, `model` on /v1, and what the server lists."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.engine.engine import Engine
from tests.support.settings import make_settings

PROMPT = "Python이란 무엇인가요?"
GREEDY = {"max_new_tokens": 8, "temperature": 0, "repetition_penalty": 1.0}  # as /v1 decodes


@pytest.fixture(scope="module")
def client(demo_model_dir: Path, adapter_dir: Path, second_adapter_dir: Path) -> Iterator[TestClient]:
    settings = make_settings(
        model_path=str(demo_model_dir), adapters={"sql": str(adapter_dir), "chat": str(second_adapter_dir)}
    )
    engine = Engine(settings)
    engine.load_startup_model()
    with TestClient(create_app(settings, engine)) as test_client:
        yield test_client


def generate(client: TestClient, **extra: str) -> str:
    response = client.post("/generate", json={"prompt": PROMPT, **GREEDY, **extra})
    assert response.status_code == 200, response.text
    text: str = response.json()["generated_text"][0]
    return text


def test_generate_and_chat_choose_the_adapter(client: TestClient) -> None:
    texts = {name: generate(client, **({"adapter": name} if name else {})) for name in ("", "sql", "chat")}
    chats = {
        name: client.post(
            "/chat", json={"instruction": PROMPT, "max_new_tokens": 8, "temperature": 0, "adapter": name}
        ).json()["response"]
        for name in ("sql", "chat")
    }

    assert len(set(texts.values())) == 3
    assert chats["sql"] != chats["chat"]


def test_openai_model_selects_an_adapter_and_any_other_name_the_base(client: TestClient) -> None:
    def complete(model: str) -> str:
        body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "temperature": 0}
        text: str = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        return text

    assert PROMPT + complete("sql") == generate(client, adapter="sql")
    assert PROMPT + complete("final_model") == generate(client) == PROMPT + complete("gpt-4o-mini")


def test_an_unknown_adapter_is_a_422_naming_it_and_the_known_ones(client: TestClient) -> None:
    response = client.post("/generate", json={"prompt": PROMPT, **GREEDY, "adapter": "nope"})

    error = response.json()["error"]
    assert response.status_code == 422 and error["code"] == "unknown_adapter"
    assert error["details"][0]["field"] == "adapter"
    assert "'nope'" in error["message"] and "sql, chat" in error["message"]


def test_the_base_and_its_adapters_are_listed(client: TestClient) -> None:
    models = client.get("/v1/models").json()["data"]
    info = client.get("/model_info").json()
    schema = client.get("/openapi.json").json()["components"]["schemas"]["GenerateRequest"]

    assert [model["id"] for model in models] == ["final_model", "sql", "chat"]
    assert info["adapters"] == ["sql", "chat"] and info["adapter"] is None and info["base_model_path"] is None
    assert schema["properties"]["adapter"]["anyOf"][0]["enum"] == ["sql", "chat"]


def test_load_model_takes_an_adapter_over_its_base(
    tmp_path: Path, demo_model_dir: Path, adapter_dir: Path
) -> None:
    settings = make_settings(model_path=str(demo_model_dir))
    engine = Engine(settings)
    engine.load_startup_model()
    client = TestClient(create_app(settings, engine))

    loaded = client.post("/load_model", params={"model_path": str(adapter_dir)})
    info = client.get("/model_info").json()

    assert loaded.status_code == 200 and loaded.json()["model_name"] == "adapter_sql"
    assert info["adapter"] == {"name": "adapter_sql", "merged": True}
    assert info["base_model_path"] == str(demo_model_dir)
