"""The HTTP API through TestClient: the original guide's shapes, errors, loads and swaps."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.engine.engine import Engine
from tests.support.settings import make_settings

GUIDE_GENERATE_KEYS = {"generated_text", "prompt", "model_name", "generation_time"}
GUIDE_CHAT_KEYS = {"response", "instruction", "model_name", "generation_time"}


def assert_clean_error(body: dict[str, object], *paths: str) -> None:
    """No traceback and no local path in an error body."""
    text = str(body)
    assert "Traceback" not in text and 'File "' not in text
    for path in paths:
        assert path not in text


def test_health_when_loaded(client: TestClient) -> None:
    response = client.get("/health")

    assert response.status_code == 200
    assert response.json() == {
        "status": "healthy",
        "model_loaded": True,
        "model_name": "final_model",
        "device": "cpu",
        "reason": None,
    }


def test_health_and_routes_when_no_model_is_loaded(tmp_path: Path) -> None:
    # GIVEN a start-up model that does not exist
    missing = str(tmp_path / "no-such-model")
    engine = Engine(make_settings(model_path=missing))
    engine.load_startup_model()
    client = TestClient(create_app(engine.settings, engine))

    # THEN /health is 503 with the guide's keys and a reason, and model routes are 503 with Retry-After
    health = client.get("/health")
    assert health.status_code == 503
    body = health.json()
    assert body["status"] == "unhealthy" and body["model_loaded"] is False and body["model_name"] is None
    assert "not an existing directory" in body["reason"]
    for response in (
        client.post("/generate", json={"prompt": "a"}),
        client.post("/chat", json={"instruction": "a"}),
        client.get("/model_info"),
    ):
        assert response.status_code == 503
        assert response.headers["Retry-After"]
        assert response.json()["error"]["code"] == "model_not_loaded"
        assert_clean_error(response.json(), missing)


def test_head_health_answers_like_get_without_a_body(client: TestClient, tmp_path: Path) -> None:
    # GIVEN a healthy server and one whose start-up model does not exist
    engine = Engine(make_settings(model_path=str(tmp_path / "no-such-model")))
    engine.load_startup_model()
    unhealthy = TestClient(create_app(engine.settings, engine))

    # WHEN a probe sends HEAD /health
    healthy_head, unhealthy_head = client.head("/health"), unhealthy.head("/health")

    # THEN it gets GET's status (and Retry-After on 503), with no body
    assert healthy_head.status_code == client.get("/health").status_code == 200
    assert unhealthy_head.status_code == unhealthy.get("/health").status_code == 503
    assert unhealthy_head.headers["Retry-After"] == "5"
    assert healthy_head.content == b"" and unhealthy_head.content == b""


def test_a_failed_start_up_load_is_retried(tmp_path: Path, demo_model_dir: Path) -> None:
    # GIVEN a start-up model directory that appears only after the first attempt
    target = tmp_path / "late_model"
    engine = Engine(make_settings(model_path=str(target), load_retry_interval_s=0))
    engine.load_startup_model()
    client = TestClient(create_app(engine.settings, engine))
    assert client.get("/health").status_code == 503

    target.symlink_to(demo_model_dir, target_is_directory=True)

    # THEN a health check starts the load in the background (it never waits for it) and it completes
    deadline = time.monotonic() + 60
    while client.get("/health").status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert client.get("/health").status_code == 200


def test_generate_has_the_guide_shape(client: TestClient) -> None:
    body = {
        "prompt": "Python이란 무엇인가요?",
        "max_new_tokens": 10,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
        "repetition_penalty": 1.1,
        "do_sample": True,
        "num_return_sequences": 2,
    }
    response = client.post("/generate", json=body)

    assert response.status_code == 200
    result = response.json()
    assert result.keys() >= GUIDE_GENERATE_KEYS
    assert len(result["generated_text"]) == 2
    assert all(text.startswith(body["prompt"]) for text in result["generated_text"])
    assert result["prompt"] == body["prompt"] and result["model_name"] == "final_model"
    assert isinstance(result["generation_time"], float)
    assert len(result["finish_reason"]) == 2
    assert result["usage"]["prompt_tokens"] > 0 and 0 < result["usage"]["completion_tokens"] <= 20


def test_generate_defaults_are_the_guides(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()["components"]["schemas"]
    generate = schema["GenerateRequest"]["properties"]
    chat = schema["ChatRequest"]["properties"]

    assert {
        name: generate[name]["default"]
        for name in (
            "max_new_tokens",
            "temperature",
            "top_p",
            "top_k",
            "repetition_penalty",
            "do_sample",
            "num_return_sequences",
        )
    } == {
        "max_new_tokens": 256,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 50,
        "repetition_penalty": 1.1,
        "do_sample": True,
        "num_return_sequences": 1,
    }
    assert {name: chat[name]["default"] for name in ("input", "max_new_tokens", "temperature", "top_p")} == {
        "input": "",
        "max_new_tokens": 256,
        "temperature": 0.7,
        "top_p": 0.9,
    }
    assert schema["GenerateRequest"]["required"] == ["prompt"]
    assert schema["ChatRequest"]["required"] == ["instruction"]


def test_greedy_generate_is_repeatable_over_http(client: TestClient) -> None:
    body = {"prompt": "머신러닝", "max_new_tokens": 12, "temperature": 0}
    first, second = client.post("/generate", json=body).json(), client.post("/generate", json=body).json()

    assert first["generated_text"] == second["generated_text"]


def test_chat_has_the_guide_shape(client: TestClient) -> None:
    response = client.post(
        "/chat", json={"instruction": "머신러닝을 설명하세요", "max_new_tokens": 12, "seed": 3}
    )

    assert response.status_code == 200
    result = response.json()
    assert result.keys() >= GUIDE_CHAT_KEYS
    assert result["response"] == result["response"].strip()
    assert "### Response:" not in result["response"]  # the continuation only
    assert result["instruction"] == "머신러닝을 설명하세요"
    assert result["finish_reason"] in ("stop", "length")


def test_model_info(client: TestClient, demo_model_dir: Path) -> None:
    info = client.get("/model_info").json()

    assert info["model_name"] == "final_model"
    assert info["model_path"] == str(demo_model_dir)
    assert info["device"] == "cpu"
    assert info["gpu_memory_allocated"] == "0.00 GB" and info["gpu_memory_reserved"] == "0.00 GB"
    assert "cpu" in info["memory_note"]
    assert info["dtype"] == "float32" and info["quantization"] == "none"
    assert info["dtype_reason"] == "float32: CPU_DTYPE=float32" and info["quantization_backend"] is None
    assert info["threads"] >= 1
    assert info["decoder"] == "ours" and info["decoder_reason"].startswith("ours: a llama model on CPU")
    assert info["parameter_count"] > 100_000 and info["context_length"] == 2048
    assert info["model_memory"].endswith("MB")
    assert info["load_timings"]["total_s"] >= info["load_timings"]["load_s"] > 0


def test_load_model_swaps_and_a_failed_load_keeps_the_old(
    fresh_engine: Engine, other_model_dir: Path, tmp_path: Path
) -> None:
    client = TestClient(create_app(fresh_engine.settings, fresh_engine))
    missing = str(tmp_path / "absent")

    failed = client.post("/load_model", params={"model_path": missing})
    assert failed.status_code == 400
    assert failed.json()["error"]["code"] == "model_load_failed"
    assert_clean_error(failed.json(), missing, str(tmp_path))
    assert client.get("/health").json()["model_name"] == "final_model"

    loaded = client.post(f"/load_model?model_path={other_model_dir}&load_in_8bit=false")
    assert loaded.status_code == 200
    assert loaded.json()["model_name"] == "other_model"
    assert loaded.json()["previous_model_name"] == "final_model"
    assert (
        client.post("/generate", json={"prompt": "a", "max_new_tokens": 2}).json()["model_name"]
        == "other_model"
    )


def test_model_info_says_why_the_auto_dtype_and_which_backend_quantizes(other_model_dir: Path) -> None:
    # GIVEN CPU_DTYPE=auto, and a 4-bit model loaded through /load_model on this CPU
    engine = Engine(make_settings(cpu_dtype="auto"))
    client = TestClient(create_app(engine.settings, engine))
    params = {"model_path": str(other_model_dir), "load_in_4bit": True}
    assert client.post("/load_model", params=params).status_code == 200

    info = client.get("/model_info").json()

    # THEN /model_info names the dtype auto chose and why, and torchao as the 4-bit backend
    assert info["quantization"] == "4bit" and info["quantization_backend"] == "torchao"
    assert info["dtype_reason"].startswith(info["dtype"] + ": ")
    assert "CPU_DTYPE=" not in info["dtype_reason"]  # auto's own reason: the CPU or the model's width
    assert info["decoder"] == "ours" and "(int4 matmuls" in info["decoder_reason"]


def test_load_model_refuses_both_quantizations(client: TestClient, demo_model_dir: Path) -> None:
    response = client.post(
        "/load_model", params={"model_path": str(demo_model_dir), "load_in_8bit": True, "load_in_4bit": True}
    )

    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "load_in_4bit"
    assert client.get("/health").json()["model_name"] == "final_model"


def test_load_model_needs_a_path(client: TestClient) -> None:
    response = client.post("/load_model")

    assert response.status_code == 422
    assert response.json()["error"]["details"][0]["field"] == "model_path"


def test_a_second_load_while_one_runs_is_409(slow_model_dir: Path, demo_model_dir: Path) -> None:
    engine = Engine(make_settings())
    client = TestClient(create_app(engine.settings, engine))
    first = threading.Thread(
        target=client.post, args=("/load_model",), kwargs={"params": {"model_path": str(slow_model_dir)}}
    )
    first.start()
    deadline = time.monotonic() + 10
    while not engine.loading and time.monotonic() < deadline:
        time.sleep(0.001)

    response = client.post("/load_model", params={"model_path": str(demo_model_dir)})
    first.join()

    assert response.status_code == 409
    assert response.json()["error"]["code"] == "model_load_in_progress"
    assert client.get("/health").json()["model_name"] == "slow_model"


def test_docs_redoc_and_openapi_are_served(client: TestClient) -> None:
    assert "swagger" in client.get("/docs").text.lower()
    assert "redoc" in client.get("/redoc").text.lower()
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/generate", "/chat", "/model_info", "/load_model"} <= paths.keys()


def test_unknown_route_and_method_use_the_error_shape(client: TestClient) -> None:
    missing, wrong_method = client.get("/nope"), client.get("/generate")

    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    assert wrong_method.status_code == 405 and wrong_method.json()["error"]["code"] == "method_not_allowed"


@pytest.mark.parametrize("name", ["model_path", "base_model_path"])
def test_load_model_paths_are_bounded(client: TestClient, name: str) -> None:
    params = {"model_path": "models/x", name: "a" * 4097}

    response = client.post("/load_model", params=params)

    detail = response.json()["error"]["details"][0]
    assert response.status_code == 422 and detail["field"] == name and detail["limit"] == 4096
