"""Server mode: one JSON log line per request with the guide's figures, and Prometheus /metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.api.observability import REQUEST_LOGGER, JsonFormatter
from function.engine.engine import Engine
from tests.support.settings import make_settings


@pytest.fixture
def client(demo_model_dir: Path) -> TestClient:
    settings = make_settings(model_path=str(demo_model_dir))
    engine = Engine(settings)
    engine.load_startup_model()
    return TestClient(create_app(settings, engine))


def logged(caplog: pytest.LogCaptureFixture) -> list[dict[str, object]]:
    formatter = JsonFormatter()
    return [json.loads(formatter.format(r)) for r in caplog.records if r.name == REQUEST_LOGGER]


def test_each_request_is_one_json_line_with_its_figures(
    client: TestClient, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER):
        first = client.get("/health")
        generated = client.post(
            "/generate", json={"prompt": "Python", "max_new_tokens": 4}, headers={"X-Request-ID": "req-42"}
        )

    health_line, generate_line = logged(caplog)
    assert health_line["route"] == "/health" and health_line["cold_start"] is True
    assert generate_line["request_id"] == "req-42" == generated.headers["X-Request-ID"]
    assert generate_line["route"] == "/generate" and generate_line["status"] == 200
    assert generate_line["cold_start"] is False
    assert generate_line["prompt_tokens"] == generated.json()["usage"]["prompt_tokens"]
    assert generate_line["completion_tokens"] == generated.json()["usage"]["completion_tokens"]
    assert 0 < float(generate_line["generation_s"]) <= float(generate_line["request_s"])  # type: ignore[arg-type]
    assert "gpu_memory_mb" in generate_line and "timestamp" in generate_line
    assert generate_line["batch_size"] == 1  # alone: nothing else was in flight
    assert first.headers["X-Request-ID"]


def metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def test_prometheus_metrics(client: TestClient) -> None:
    client.post("/generate", json={"prompt": "Python", "max_new_tokens": 3, "temperature": 0})
    client.post("/chat", json={"instruction": "hi", "max_new_tokens": 3})
    client.post("/generate", json={"prompt": ""})

    scraped = client.get("/metrics")

    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    text = scraped.text
    assert metric(text, 'llm_requests_total{route="/generate",status="200"}') == 1
    assert metric(text, 'llm_requests_total{route="/generate",status="422"}') == 1
    assert metric(text, 'llm_requests_total{route="/chat",status="200"}') == 1
    assert metric(text, 'llm_generation_seconds_count{route="/generate"}') == 1
    assert metric(text, 'llm_tokens_total{kind="completion"}') >= 2
    assert metric(text, 'llm_tokens_total{kind="prompt"}') > 0
    assert metric(text, "llm_batch_size_count") == 2  # one per generated answer
    assert "/metrics" not in client.get("/openapi.json").json()["paths"]


def test_a_cached_answer_is_logged_with_batch_size_0_and_not_counted_as_a_batch(
    demo_model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(model_path=str(demo_model_dir), response_cache_size=8)
    engine = Engine(settings)
    engine.load_startup_model()
    cached_client = TestClient(create_app(settings, engine))
    body = {"prompt": "Python", "max_new_tokens": 3, "temperature": 0}

    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER):
        cached_client.post("/generate", json=body)
        cached_client.post("/generate", json=body)

    assert [line["batch_size"] for line in logged(caplog)] == [1, 0]
    assert metric(cached_client.get("/metrics").text, "llm_batch_size_count") == 1
