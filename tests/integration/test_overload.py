"""Real servers under abuse and overload: clients that hang up stop their generation, requests past the
admission limit get 503 at once while /health stays quick, and streamed requests reach the metrics.

The slow demo model (~25M parameters) makes 2000 tokens at least 20 s of work on an idle 2-core CPU
(minutes on a loaded one): a generation that was not stopped, or a request that waited behind one, is
seen from far away. Long requests decode greedily from "Python": the random model's greedy text falls
into a loop and never writes its end token, so they run their whole length unless stopped (a sampled
one could end early by chance).
"""

from __future__ import annotations

import statistics
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from tests.support.ports import free_port
from tests.support.raw_http import metric, open_request, read_until
from tests.support.servers import serve_command, start, stop, wait_healthy
from tests.support.waiting import wait_until

pytestmark = pytest.mark.server
LONG = 2000  # tokens (the slow model's context is 2048): 20 s and more of its time
LONG_GENERATE = {"prompt": "Python", "max_new_tokens": LONG, "temperature": 0, "repetition_penalty": 1.0}
LONG_STREAM = {"prompt": "Python", "max_tokens": LONG, "temperature": 0, "stream": True}
QUICK_S = 10.0  # a small request on an idle server: about a second on a loaded 2-core machine


def serve(model_dir: Path, **env: str) -> Iterator[tuple[str, int]]:
    port = free_port()
    process = start(
        serve_command(model_dir, port),
        env={"MAX_NEW_TOKENS": str(LONG), "RATE_LIMIT": "", "RESPONSE_CACHE_SIZE": "0", **env},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url, port
    finally:
        stop(process)


@pytest.fixture(scope="module")
def server(slow_model_dir: Path) -> Iterator[tuple[str, int]]:
    yield from serve(slow_model_dir)


@pytest.fixture(scope="module")
def small_queue(slow_model_dir: Path) -> Iterator[tuple[str, int]]:
    """Two generation requests admitted at once, each generated alone."""
    yield from serve(slow_model_dir, MAX_QUEUED_REQUESTS="2", BATCH_MAX_SIZE="1")


def small_request(url: str) -> tuple[requests.Response, float]:
    """A fresh 4-token /generate (a new prompt each time) and how long it took."""
    started = time.perf_counter()
    body: dict[str, Any] = {"prompt": f"Python {uuid.uuid4().hex[:6]}", "max_new_tokens": 4, "temperature": 0}
    response = requests.post(f"{url}/generate", json=body, timeout=120)
    return response, time.perf_counter() - started


def test_clients_that_hang_up_stop_their_generation(server: tuple[str, int]) -> None:
    url, port = server
    # GIVEN four clients asking for 2000 tokens each (one batch: minutes of work)
    sockets = [open_request(port, "/generate", LONG_GENERATE) for _ in range(4)]
    time.sleep(0.5)  # read, admitted, generating

    # WHEN they hang up
    for sock in sockets:
        sock.close()

    # THEN the server ends each one as a 499 (its own count), and a fresh request is answered at once
    assert wait_until(lambda: metric(url, "llm_requests_total", route="/generate", status="499") == 4, 60)
    response, seconds = small_request(url)
    assert response.status_code == 200 and seconds < QUICK_S


def test_streams_that_hang_up_stop_their_generation(server: tuple[str, int]) -> None:
    url, port = server
    # GIVEN two streams of 2000 tokens (each generated alone: one after the other), the first sending
    first = open_request(port, "/v1/completions", LONG_STREAM)
    assert b"data: " in read_until(first, b"data: ")
    second = open_request(port, "/v1/completions", LONG_STREAM)

    # WHEN both hang up
    first.close()
    second.close()

    # THEN their generations stop: a fresh request is answered at once, not after 2000 tokens or more
    response, seconds = small_request(url)
    assert response.status_code == 200 and seconds < QUICK_S


def test_a_streamed_completion_is_counted_in_the_metrics(server: tuple[str, int]) -> None:
    # Needs the request log line of a stream to be written after its last chunk, with the figures its
    # route recorded there (function/api/observability.py).
    url, _ = server
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    before = metric(url, "llm_tokens_total", kind="completion")

    chunks = list(
        client.completions.create(
            model="slow_model",
            prompt="Python",
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    assert wait_until(
        lambda: metric(url, "llm_tokens_total", kind="completion") == before + usage.completion_tokens, 10
    )


def test_past_the_limit_requests_get_503_at_once_and_health_stays_quick(small_queue: tuple[str, int]) -> None:
    url, port = small_queue
    # GIVEN both places taken by two admitted streams of 2000 tokens (the second waits for the first)
    first = open_request(port, "/v1/completions", LONG_STREAM)
    assert b"data: " in read_until(first, b"data: ")
    second = open_request(port, "/v1/completions", LONG_STREAM)
    assert read_until(second, b"\r\n").startswith(b"HTTP/1.1 200")

    # WHEN six more generation requests arrive at once, on every route, while /health is probed
    requests_past_the_limit: list[tuple[str, dict[str, Any]]] = [
        ("/generate", {"prompt": "Python", "max_new_tokens": 4}),
        ("/chat", {"instruction": "Python", "max_new_tokens": 4}),
        ("/v1/completions", {"prompt": "Python", "max_tokens": 4}),
        ("/v1/completions", {"prompt": "Python", "max_tokens": 4, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Python"}], "max_tokens": 4}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "stream": True}),
    ]

    def timed(path: str, json: dict[str, Any]) -> tuple[requests.Response, float]:
        started = time.perf_counter()
        response = requests.post(f"{url}{path}", json=json, timeout=30)
        return response, time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=len(requests_past_the_limit)) as pool:
        futures = [pool.submit(timed, path, json) for path, json in requests_past_the_limit]
        health = [timed_get(f"{url}/health") for _ in range(5)]
        refused = [future.result() for future in futures]

    # THEN each is refused at once with 503 and Retry-After: 1, and /health answered quickly throughout
    for response, seconds in refused:
        assert response.status_code == 503 and response.headers["Retry-After"] == "1"
        assert response.json()["error"]["code"] == "overloaded" and seconds < 5
    assert all(response.status_code == 200 for response, _ in health)
    assert statistics.median(seconds for _, seconds in health) < 1.0
    assert metric(url, "llm_requests_total", route="/generate", status="503") == 1

    # WHEN the two streams end (their clients hang up)
    first.close()
    second.close()

    # THEN requests are admitted again
    assert wait_until(lambda: small_request(url)[0].status_code == 200, 60, interval=0.5)


def timed_get(url: str) -> tuple[requests.Response, float]:
    started = time.perf_counter()
    response = requests.get(url, timeout=30)
    return response, time.perf_counter() - started
