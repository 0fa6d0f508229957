"""What the service tells its operators: a JSON log line per request, and metrics.

Every request is logged once as JSON, once its response is sent (a stream's last chunk included), with
its request id, route (the matched route's template; `unmatched` for 404s), path, status, request seconds
(요청 시간), generation seconds (생성 시간), tokens in and out, GPU memory (GPU 메모리 사용량)
and whether it was the environment's first (cold) response. On Lambda the line goes through
Powertools' Logger (which adds the invocation's context) and metrics are written in the
embedded metric format (EMF); in server mode Prometheus scrapes `/metrics`.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import Response
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from function.api.errors import route_path

if TYPE_CHECKING:
    from function.engine.types import Completion

REQUEST_LOGGER = "llm_function.requests"
NAMESPACE = "LlmFunction"


class JsonFormatter(logging.Formatter):
    """One JSON object a line: the message's fields, with time and level (server mode)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None) or {"message": record.getMessage()}
        return json.dumps(
            {"timestamp": round(record.created, 3), "level": record.levelname, **fields}, ensure_ascii=False
        )


def request_logger() -> logging.Logger:
    logger = logging.getLogger(REQUEST_LOGGER)
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(JsonFormatter())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False  # its own JSON handler; the root's plain format would print it twice
    return logger


def record_generation(request: Request, result: Completion) -> None:
    """Routes call this so the request's log line and metrics carry the generation's figures."""
    request.state.generation = {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "generation_s": round(result.generation_time, 4),
        "batch_size": result.batch_size,
    }


def gpu_memory_mb() -> float | None:
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return None
    return round(float(torch.cuda.memory_allocated()) / 2**20, 1)


class PrometheusMetrics:
    """Server mode: request, generation and token metrics on a registry of this app's own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter(
            "llm_requests", "Requests by route and status", ["route", "status"], registry=self.registry
        )
        self.request_seconds = Histogram(
            "llm_request_seconds", "Request time", ["route"], registry=self.registry
        )
        self.generation_seconds = Histogram(
            "llm_generation_seconds", "Generation time", ["route"], registry=self.registry
        )
        self.tokens = Counter("llm_tokens", "Tokens by kind", ["kind"], registry=self.registry)
        self.batch_size = Histogram(
            "llm_batch_size",
            "Requests that shared a generate call (micro-batching), per request",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )

    def observe(self, entry: dict[str, Any]) -> None:
        self.requests.labels(entry["route"], str(entry["status"])).inc()
        self.request_seconds.labels(entry["route"]).observe(entry["request_s"])
        if "generation_s" in entry:
            self.generation_seconds.labels(entry["route"]).observe(entry["generation_s"])
            self.tokens.labels("prompt").inc(entry["prompt_tokens"])
            self.tokens.labels("completion").inc(entry["completion_tokens"])
            if entry["batch_size"]:  # 0: the response cache answered, no generate call to count
                self.batch_size.observe(entry["batch_size"])

    def exposition(self) -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)


RequestSink = Callable[[dict[str, Any]], None]
UNMATCHED = "unmatched"  # the route label of every request no route matched (404s): a bounded label set
MAX_LOGGED_PATH = 512


def route_label(scope: Scope) -> str:
    """The matched route's template ("/generate", "/docs/assets/{name}"), or `UNMATCHED`: never the
    request's own path, so clients cannot mint metric series."""
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RequestObservability:
    """One log line and one metrics observation per request, once its response has been sent in full.

    Pure ASGI, so a streamed response (server-sent events) is observed after its last chunk, with the
    figures its route recorded at the stream's end (`record_generation`). Also sets `X-Request-ID`.
    """

    def __init__(
        self,
        app: ASGIApp,
        sink: RequestSink | None,
        logger: logging.Logger | None,
        metrics: PrometheusMetrics | None,
    ) -> None:
        self.app = app
        self.sink = sink
        self.logger = logger
        self.metrics = metrics
        self.responses = itertools.count()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        state = scope.setdefault("state", {})  # request.state, shared with the route that records figures
        context = scope.get("aws.context")
        request_id = (
            getattr(context, "aws_request_id", None)
            or Headers(scope=scope).get("x-request-id")
            or str(uuid.uuid4())
        )
        status = 500  # unless a response starts: an exception escaped the app

        async def send_observed(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["X-Request-ID"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_observed)
        finally:
            self.observe(scope, state, request_id, status, time.perf_counter() - started)

    def observe(
        self, scope: Scope, state: dict[str, Any], request_id: str, status: int, seconds: float
    ) -> None:
        route = route_label(scope)
        entry: dict[str, Any] = {
            "message": "request",
            "request_id": request_id,
            "method": scope.get("method"),
            "route": route,
            "path": route_path(scope)[:MAX_LOGGED_PATH],
            "status": status,
            "request_s": round(seconds, 4),
            "cold_start": next(self.responses) == 0,
            "gpu_memory_mb": gpu_memory_mb(),
            **(state.get("generation") or {}),
        }
        event = scope.get("aws.event") or {}
        if event:
            entry["api_request_id"] = (event.get("requestContext") or {}).get("requestId")
        if self.sink is not None:
            self.sink(entry)
        elif self.logger is not None:
            self.logger.info("request", extra={"fields": entry})
        if self.metrics is not None and route != "/metrics":
            self.metrics.observe(entry)


def install_observability(app: FastAPI, *, sink: RequestSink | None = None) -> None:
    """The per-request log line for every route. Server mode (no sink): a JSON log line and a
    Prometheus `/metrics`. Lambda: the handler's sink (Powertools Logger and EMF metrics)."""
    logger = request_logger() if sink is None else None  # now, not at the first request
    metrics = PrometheusMetrics() if sink is None else None
    app.state.metrics = metrics
    app.add_middleware(RequestObservability, sink=sink, logger=logger, metrics=metrics)

    if metrics is not None:

        @app.get("/metrics", include_in_schema=False)
        def prometheus() -> Response:
            return metrics.exposition()
