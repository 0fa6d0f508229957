"""LLMClient, its examples and `python -m function test-api`, against real server processes."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from function.client import APIError, LLMClient
from tests.support.ports import free_port
from tests.support.servers import serve_command, start, stop, wait_healthy

pytestmark = pytest.mark.server
USER_KEY, ADMIN_KEY = "client-user-key-0123", "client-admin-key-0123"


def serve(model_dir: Path, **env: str) -> tuple[str, subprocess.Popen[bytes]]:
    port = free_port()
    process = start(serve_command(model_dir, port), env=env)
    return f"http://127.0.0.1:{port}", process


@pytest.fixture(scope="module")
def server(demo_model_dir: Path) -> Iterator[str]:
    url, process = serve(demo_model_dir, API_KEYS=USER_KEY, ADMIN_API_KEYS=ADMIN_KEY, RATE_LIMIT="")
    try:
        wait_healthy(url, process)
        yield url
    finally:
        stop(process)


def test_every_method(server: str, other_model_dir: Path, demo_model_dir: Path) -> None:
    client = LLMClient(server, api_key=ADMIN_KEY)

    assert client.health_check()["status"] == "healthy"
    generated = client.generate("Python이란?", max_new_tokens=8, temperature=0)
    assert (
        generated["generated_text"][0].startswith("Python이란?") and generated["usage"]["prompt_tokens"] > 0
    )
    assert isinstance(client.chat(instruction="머신러닝을 설명하세요", max_new_tokens=8)["response"], str)
    assert client.model_info()["model_name"] == "final_model"
    prompts = ["a", "b", "c", "d", "e"]
    assert [r["prompt"] for r in client.batch(prompts, max_new_tokens=2)] == prompts
    try:
        loaded = client.load_model(str(other_model_dir))
        assert loaded["model_name"] == "other_model" and loaded["previous_model_name"] == "final_model"
    finally:
        client.load_model(str(demo_model_dir))


def test_errors_carry_the_servers_body(server: str) -> None:
    with pytest.raises(APIError) as invalid:
        LLMClient(server, api_key=USER_KEY).generate("x", top_p=2)
    with pytest.raises(APIError) as unauthorized:
        LLMClient(server).generate("x")

    assert invalid.value.status == 422 and invalid.value.code == "invalid_request"
    assert invalid.value.body["error"]["details"][0]["field"] == "top_p"
    assert unauthorized.value.status == 401 and "API key" in unauthorized.value.message


def test_429_is_retried_after_the_servers_retry_after(demo_model_dir: Path) -> None:
    url, process = serve(demo_model_dir, RATE_LIMIT="2/second")
    try:
        wait_healthy(url, process)
        with pytest.raises(APIError) as limited:
            impatient = LLMClient(url, max_retries=0)
            for _ in range(3):
                impatient.generate("x", max_new_tokens=1)
        started = time.monotonic()
        patient = LLMClient(url, max_retries=4)
        results = [patient.generate("x", max_new_tokens=1) for _ in range(5)]
        waited = time.monotonic() - started
    finally:
        stop(process)

    assert limited.value.status == 429
    assert len(results) == 5 and waited >= 1.0  # it waited out the window instead of failing


def test_503_without_a_model_is_an_error_with_the_reason(demo_model_dir: Path, tmp_path: Path) -> None:
    url, process = serve(demo_model_dir)
    try:
        wait_healthy(url, process)
        client = LLMClient(url, api_key=ADMIN_KEY)
        assert client.health_check()["model_loaded"] is True
    finally:
        stop(process)
    missing_url, missing = serve(tmp_path / "absent")
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                health = LLMClient(missing_url).health_check()
                break
            except Exception:
                time.sleep(0.2)
        with pytest.raises(APIError) as unavailable:
            LLMClient(missing_url, max_retry_wait=1).generate("x")
    finally:
        stop(missing)

    assert health["status"] == "unhealthy" and health["reason"]
    assert unavailable.value.status == 503 and unavailable.value.code == "model_not_loaded"


def test_the_client_imports_no_torch_or_transformers() -> None:
    code = (
        "import sys, function.client, function.api_tester; "
        "print(sorted(m for m in ('torch', 'transformers', 'pydantic_settings') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert result.stdout.strip() == "[]", result.stderr


@pytest.mark.parametrize("example", ["basic", "chat", "batch"])
def test_client_examples(server: str, example: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "function.client", example, "--url", server, "--api-key", USER_KEY],
        capture_output=True,
        text=True,
        timeout=300,
    )

    assert result.returncode == 0, result.stderr
    assert f"== {example} ==" in result.stdout


def run_test_api(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "function", "test-api", *args],
        capture_output=True,
        text=True,
        timeout=300,
        input=stdin,
    )


@pytest.mark.parametrize("mode", ["all", "health", "chat"])
def test_test_api_modes_pass_against_a_healthy_server(server: str, mode: str) -> None:
    result = run_test_api("--mode", mode, "--url", server, "--api-key", USER_KEY)

    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout


def test_test_api_fails_with_a_wrong_key_or_no_server(server: str) -> None:
    wrong_key = run_test_api("--mode", "chat", "--url", server, "--api-key", "nope")
    no_server = run_test_api("--mode", "health", "--url", f"http://127.0.0.1:{free_port()}")

    assert wrong_key.returncode == 1 and "401" in wrong_key.stdout
    assert no_server.returncode == 1


def test_interactive_mode_answers_questions(server: str) -> None:
    result = run_test_api(
        "--mode",
        "interactive",
        "--url",
        server,
        "--api-key",
        USER_KEY,
        stdin="Python이란 무엇인가요?\n\n머신러닝을 설명하세요\nquit\n",
    )

    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("답변:") == 2
