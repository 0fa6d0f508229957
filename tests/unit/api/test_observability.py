"""Server mode: one JSON log line per request with the guide's figures, and Prometheus /metrics."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.api.observability import REQUEST_LOGGER, JsonFormatter, install_observability, record_generation
from function.engine.engine import Engine
from function.engine.types import Completion
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


def series(text: str, name: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(name + "{")]


def test_unknown_paths_share_one_route_label(served_engine: Engine, caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN a server that has answered a few requests
    client = TestClient(create_app(served_engine.settings, served_engine))
    client.get("/health")
    client.get("/nope-0")
    before = client.get("/metrics").text

    # WHEN clients ask for hundreds of paths that match no route (no key needed, no rate limit)
    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER):
        statuses = {client.get(f"/nope-{i}/{uuid.uuid4().hex}").status_code for i in range(300)}
    after = client.get("/metrics").text

    # THEN they are one series, labelled "unmatched": the scrape does not grow with them
    assert statuses == {404}
    assert len(series(after, "llm_requests_total")) == len(series(before, "llm_requests_total"))
    assert metric(after, 'llm_requests_total{route="unmatched",status="404"}') == 301
    assert "nope-" not in after
    assert len(after) < len(before) + 200  # only counts changed
    # and the log line keeps the path the client asked for
    line = [line for line in logged(caplog) if line["status"] == 404][-1]
    assert line["route"] == "unmatched" and str(line["path"]).startswith("/nope-299/")


def test_a_route_with_a_parameter_is_labelled_by_its_template(served_engine: Engine) -> None:
    client = TestClient(create_app(served_engine.settings, served_engine))

    client.get("/docs/assets/swagger-ui.css")
    client.get("/docs/assets/no-such-asset.js")
    client.post("/health")  # 405: matched the path, not the method

    text = client.get("/metrics").text
    assert metric(text, 'llm_requests_total{route="/docs/assets/{name}",status="200"}') == 1
    assert metric(text, 'llm_requests_total{route="/docs/assets/{name}",status="404"}') == 1
    assert metric(text, 'llm_requests_total{route="/health",status="405"}') == 1
    assert "no-such-asset" not in text


def streaming_app() -> FastAPI:
    """A tiny app of our own: a route that streams and records its generation after its last chunk, as
    the /v1 routes do with `stream: true`, and a route with a bug."""
    app = FastAPI()
    install_observability(app)

    @app.get("/stream")
    def stream(request: Request) -> StreamingResponse:
        def body() -> Iterator[str]:
            yield "data: 1\n\n"
            yield "data: [DONE]\n\n"
            done = Completion(
                "p",
                ["ab"],
                ["length"],
                prompt_tokens=3,
                completion_tokens=2,
                generation_time=0.01,
                model_name="m",
            )
            record_generation(request, done)

        return StreamingResponse(body(), media_type="text/event-stream")

    @app.get("/bug")
    def bug() -> None:
        raise RuntimeError("a bug")

    return app


def test_a_streamed_response_is_observed_after_its_last_chunk(caplog: pytest.LogCaptureFixture) -> None:
    # GIVEN a route whose figures are known only once its stream has ended
    client = TestClient(streaming_app())

    # WHEN it streams
    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER):
        response = client.get("/stream", headers={"X-Request-ID": "stream-1"})

    # THEN the log line and the metrics carry the generation's figures
    assert response.text.endswith("data: [DONE]\n\n") and response.headers["X-Request-ID"] == "stream-1"
    (line,) = logged(caplog)
    assert line["route"] == "/stream" and line["status"] == 200 and line["request_id"] == "stream-1"
    assert (line["prompt_tokens"], line["completion_tokens"], line["batch_size"]) == (3, 2, 1)
    text = client.get("/metrics").text
    assert metric(text, 'llm_tokens_total{kind="completion"}') == 2
    assert metric(text, 'llm_tokens_total{kind="prompt"}') == 3
    assert metric(text, 'llm_generation_seconds_count{route="/stream"}') == 1


def test_a_request_that_raises_is_still_logged_as_a_500(caplog: pytest.LogCaptureFixture) -> None:
    client = TestClient(streaming_app(), raise_server_exceptions=False)

    with caplog.at_level(logging.INFO, logger=REQUEST_LOGGER):
        assert client.get("/bug").status_code == 500

    (line,) = logged(caplog)
    assert line["route"] == "/bug" and line["status"] == 500
