"""The Lambda handler, built by `build_handler(settings, engine)` around the same FastAPI app.

- API Gateway REST (v1), HTTP API (v2), Function URL and ALB events: through Mangum.
- Direct invocations: Mangum too, through the `DirectPayload` custom handler.
- Warm-up pings (`{"warmup": true}` or an EventBridge scheduled event): answered at once.
- Anything else: a 400 in the one error shape, never an exception.

Generation gets a deadline before the invocation's remaining time, and before API Gateway's
29 s integration timeout, so it ends with `finish_reason: "time"` instead of a 502/504.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from mangum import Mangum
from starlette.types import ASGIApp, Receive, Scope, Send

from function.api.errors import domain_error_content
from function.api.factory import create_app
from function.api.observability import NAMESPACE
from function.aws.direct import DirectPayload, check_direct_payload, is_direct_payload
from function.aws.limits import generation_budget, within_payload_limit
from function.config import Settings
from function.engine.deadline import deadline_in
from function.engine.engine import Engine
from function.errors import LLMFunctionError, UnsupportedEventError

LambdaHandler = Callable[[dict[str, Any], Any], dict[str, Any]]
SERVICE = "llm-function"
UNSUPPORTED_EVENT = (
    "unsupported event: send an API Gateway, Function URL or ALB event, a direct payload "
    '{"path", "method", "body", "headers", "query"}, or {"warmup": true}'
)


class StageRootPath:
    """Behind a REST API stage (`/dev/docs`), tell the app its root path so /docs finds its schema."""

    def __init__(self, asgi_app: ASGIApp) -> None:
        self.app = asgi_app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_context = (scope.get("aws.event") or {}).get("requestContext") or {}
        stage = request_context.get("stage")
        if stage and stage != "$default" and str(request_context.get("path", "")).startswith(f"/{stage}/"):
            scope = {**scope, "root_path": f"/{stage}"}
        await self.app(scope, receive, send)


def is_warmup(event: dict[str, Any]) -> bool:
    if event.get("warmup") is True:
        return True
    return event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event"


def event_path(event: dict[str, Any]) -> str:
    """The request path an event asks for (v2 `rawPath`, v1 and ALB `path`), for the error shape."""
    path = event.get("rawPath") or event.get("path") or ""
    return path if isinstance(path, str) else ""


def error_event(error: LLMFunctionError, *, path: str = "") -> dict[str, Any]:
    """An event the app never saw, answered with the one error body (as a direct payload's JSON)."""
    content = domain_error_content(error, path=path)
    return {
        "statusCode": content.status,
        "headers": {"content-type": "application/json", **content.headers},
        "body": content.body,
    }


def build_handler(settings: Settings, engine: Engine) -> LambdaHandler:
    """The Lambda handler over `engine`: its own app, Mangum adapter, Powertools logger and metrics."""
    logger = Logger(service=SERVICE)
    metrics = Metrics(namespace=NAMESPACE, service=SERVICE)
    warnings.filterwarnings("ignore", message="No application metrics to publish")  # warm pings add none

    def record_request(entry: dict[str, Any]) -> None:
        """Each request: one JSON log line through Powertools, and its generation as EMF metrics."""
        logger.info("request", extra={key: value for key, value in entry.items() if key != "message"})
        if "generation_s" in entry:
            metrics.add_metric(
                name="TokensGenerated", unit=MetricUnit.Count, value=entry["completion_tokens"]
            )
            metrics.add_metric(name="GenerationSeconds", unit=MetricUnit.Seconds, value=entry["generation_s"])

    app = create_app(settings, engine, request_sink=record_request)
    adapter = Mangum(StageRootPath(app), lifespan="off", custom_handlers=[DirectPayload])
    cold_start_pending = True

    def record_cold_start_metrics() -> None:
        """The start-up phases as metrics, once per environment (with its first invocation)."""
        nonlocal cold_start_pending
        phases = engine.cold_start()
        if not cold_start_pending or phases is None:
            return
        cold_start_pending = False
        metrics.add_metric(name="LoadSeconds", unit=MetricUnit.Seconds, value=phases["load_s"])
        metrics.add_metric(name="FetchSeconds", unit=MetricUnit.Seconds, value=phases["fetch_s"])
        if phases.get("fetch_mb_per_s"):
            metrics.add_metric(
                name="FetchMBps", unit=MetricUnit.MegabytesPerSecond, value=phases["fetch_mb_per_s"]
            )

    def route_event(event: dict[str, Any], context: Any) -> dict[str, Any]:
        if not isinstance(event, dict):
            return error_event(UnsupportedEventError(UNSUPPORTED_EVENT))
        if is_warmup(event):
            return {"warmup": True, "model_loaded": engine.current is not None}
        direct = is_direct_payload(event)
        if not direct and "requestContext" not in event:
            return error_event(UnsupportedEventError(UNSUPPORTED_EVENT))
        path = event_path(event)
        try:
            if direct:
                check_direct_payload(event)
        except LLMFunctionError as exc:
            return error_event(exc, path=path)
        with deadline_in(generation_budget(event, context)):
            return within_payload_limit(adapter(event, context), path=path, direct=direct)

    @metrics.log_metrics(capture_cold_start_metric=True)
    @logger.inject_lambda_context
    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        """Route one Lambda event to the app; see the module docstring for the accepted shapes."""
        record_cold_start_metrics()
        return route_event(event, context)

    decorated: LambdaHandler = handler  # Powertools' decorators are untyped
    return decorated
