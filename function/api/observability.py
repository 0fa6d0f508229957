"""What the service tells its operators: a JSON log line per request, and metrics.

Every request is logged once as JSON with its request id, route, status, request seconds
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


def install_observability(app: FastAPI, *, sink: RequestSink | None = None) -> None:
    """The per-request log line for every route. Server mode (no sink): a JSON log line and a
    Prometheus `/metrics`. Lambda: the handler's sink (Powertools Logger and EMF metrics)."""
    logger = request_logger() if sink is None else None
    responses = itertools.count()
    metrics = PrometheusMetrics() if sink is None else None
    app.state.metrics = metrics

    @app.middleware("http")
    async def log_request(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        event = request.scope.get("aws.event") or {}
        context = request.scope.get("aws.context")
        request_id = (
            getattr(context, "aws_request_id", None)
            or request.headers.get("x-request-id")
            or str(uuid.uuid4())
        )
        response = await call_next(request)
        route = getattr(request.scope.get("route"), "path", request.url.path)
        entry: dict[str, Any] = {
            "message": "request",
            "request_id": request_id,
            "method": request.method,
            "route": route,
            "status": response.status_code,
            "request_s": round(time.perf_counter() - started, 4),
            "cold_start": next(responses) == 0,
            "gpu_memory_mb": gpu_memory_mb(),
            **getattr(request.state, "generation", {}),
        }
        if event:
            entry["api_request_id"] = (event.get("requestContext") or {}).get("requestId")
        if sink is not None:
            sink(entry)
        elif logger is not None:
            logger.info("request", extra={"fields": entry})
        if metrics is not None and route != "/metrics":
            metrics.observe(entry)
        response.headers["X-Request-ID"] = request_id
        return response

    if metrics is not None:

        @app.get("/metrics", include_in_schema=False)
        def prometheus() -> Response:
            return metrics.exposition()
