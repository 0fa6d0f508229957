"""The Lambda handler, built by `build_handler(settings, engine)` around the same FastAPI app.

- API Gateway REST (v1), HTTP API (v2), Function URL and ALB events: through Mangum.
- Direct invocations: Mangum too, through the `DirectPayload` custom handler.
- Warm-up pings (`{"warmup": true}` or an EventBridge scheduled event): answered at once.
- Anything else: a 400 in the one error shape, never an exception. An HTTP event whose fields are
  not what AWS sends (no `httpMethod`, invalid base64, a list of headers…) is checked before Mangum
  sees it (`function.aws.events`), and what Mangum still cannot translate is caught around its
  translation only: a 400 `malformed_event` either way. The app's own errors (a bug is a 500) are
  answered by the app.

Generation gets a deadline before the invocation's remaining time, and before API Gateway's
29 s integration timeout, so it ends with `finish_reason: "time"` instead of a 502/504.
"""

from __future__ import annotations

import json
import logging
import warnings
from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from mangum import Mangum
from mangum.types import LambdaConfig, LambdaContext, LambdaEvent, Response
from mangum.types import LambdaHandler as MangumHandler
from starlette.types import ASGIApp, Receive, Scope, Send

from function.api.errors import domain_error_content
from function.api.factory import create_app
from function.api.observability import NAMESPACE
from function.aws.direct import DirectPayload, check_direct_payload, is_direct_payload
from function.aws.events import UNKNOWN_EVENT, check_http_event
from function.aws.limits import generation_budget, within_payload_limit
from function.aws.snapstart import register_hooks
from function.config import Settings
from function.engine.deadline import deadline_in
from function.engine.engine import Engine
from function.errors import LLMFunctionError, MalformedEventError, UnsupportedEventError

logger = logging.getLogger(__name__)

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
        event = scope.get("aws.event")
        request_context = event.get("requestContext") if isinstance(event, dict) else None
        if isinstance(request_context, dict):
            stage, path = request_context.get("stage"), request_context.get("path")
            if (
                isinstance(stage, str)
                and stage not in ("", "$default")
                and str(path).startswith(f"/{stage}/")
            ):
                scope = {**scope, "root_path": f"/{stage}"}
        await self.app(scope, receive, send)


# What Mangum raises on an event it cannot translate (binascii.Error and UnicodeError are ValueErrors;
# RuntimeError is "unable to infer a handler").
TRANSLATION_ERRORS = (KeyError, IndexError, TypeError, ValueError, AttributeError, RuntimeError)


def malformed_event(exc: Exception) -> MalformedEventError:
    """What Mangum's translation raised, as the caller's mistake: the missing key where it says one."""
    if isinstance(exc, KeyError) and exc.args and isinstance(exc.args[0], str):
        field = exc.args[0]
        return MalformedEventError(
            f"the event has no {field!r}, which its kind of HTTP event needs", field=field
        )
    if isinstance(exc, RuntimeError):
        return MalformedEventError(UNKNOWN_EVENT, field="requestContext")
    message = (
        "the event cannot be read as an HTTP request: a field has the wrong JSON type or an invalid value"
    )
    return MalformedEventError(message)


class TranslatedEvent:
    """Mangum's handler for one event, with the request (scope, body) built up front, so that only the
    event's translation, never the app, can raise `MalformedEventError`."""

    def __init__(self, handler: MangumHandler) -> None:
        self.handler = handler
        self._scope = handler.scope
        self._body = handler.body

    @classmethod
    def infer(cls, event: LambdaEvent, context: LambdaContext, config: LambdaConfig) -> bool:
        return False  # never inferred: it only wraps the handler Mangum inferred

    @property
    def scope(self) -> Scope:
        return self._scope

    @property
    def body(self) -> bytes:
        return self._body

    def __call__(self, response: Response) -> dict[str, Any]:
        return self.handler(response)


class EventAdapter(Mangum):
    """Mangum, whose translation of the event into a request raises `MalformedEventError` instead of
    whatever its handlers raise; the app runs after, and its errors are its own (Mangum catches them)."""

    def infer(self, event: LambdaEvent, context: LambdaContext) -> MangumHandler:
        try:
            return TranslatedEvent(super().infer(event, context))
        except TRANSLATION_ERRORS as exc:
            logger.warning("malformed event: %s", type(exc).__name__, exc_info=True)
            raise malformed_event(exc) from exc


def is_warmup(event: dict[str, Any]) -> bool:
    if event.get("warmup") is True:
        return True
    return event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event"


def event_path(event: dict[str, Any]) -> str:
    """The request path an event asks for (v2 `rawPath`, v1 and ALB `path`), for the error shape."""
    path = event.get("rawPath") or event.get("path") or ""
    return path if isinstance(path, str) else ""


def error_event(error: LLMFunctionError, *, path: str = "", http: bool = False) -> dict[str, Any]:
    """An event the app never saw, answered with the one error body: as a direct payload's JSON, or
    (`http`) as the JSON string API Gateway, Function URLs and ALBs need."""
    content = domain_error_content(error, path=path)
    headers = {"content-type": "application/json", **content.headers}
    if http:
        body = json.dumps(content.body)
        return {"statusCode": content.status, "headers": headers, "body": body, "isBase64Encoded": False}
    return {"statusCode": content.status, "headers": headers, "body": content.body}


def build_handler(
    settings: Settings, engine: Engine, *, refresh_settings: Callable[[], Settings] | None = None
) -> LambdaHandler:
    """The Lambda handler over `engine`: its own app, Mangum adapter, Powertools logger and metrics.

    Under SnapStart it registers the before-snapshot and after-restore hooks (`function.aws.snapstart`);
    `refresh_settings` gives the settings again after a restore, with the API keys read anew."""
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
    if settings.snap_start:
        register_hooks(engine, app, refresh_settings or (lambda: settings))
    adapter = EventAdapter(StageRootPath(app), lifespan="off", custom_handlers=[DirectPayload])
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
        if phases.get("restored"):
            metrics.add_metric(name="RestoreSeconds", unit=MetricUnit.Seconds, value=phases["restore_s"])
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
            else:
                check_http_event(event)
        except LLMFunctionError as exc:
            return error_event(exc, path=path, http=not direct)
        with deadline_in(generation_budget(event, context)):
            try:
                response = adapter(event, context)
            except MalformedEventError as exc:  # raised by EventAdapter.infer only, before the app runs
                return error_event(exc, path=path, http=not direct)
        return within_payload_limit(response, path=path, direct=direct)

    @metrics.log_metrics(capture_cold_start_metric=True)
    @logger.inject_lambda_context
    def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
        """Route one Lambda event to the app; see the module docstring for the accepted shapes."""
        record_cold_start_metrics()
        return route_event(event, context)

    decorated: LambdaHandler = handler  # Powertools' decorators are untyped
    return decorated
