"""AWS Lambda entry point: `function.handler.handler`.

Importing this module is the cold start: it imports the app, torch and transformers, builds the
process-wide engine (fetching `MODEL_PATH` from S3 into /tmp and loading it) and wraps the app
in Mangum with the lifespan off. Each invocation then goes to the same FastAPI app:

- API Gateway REST (v1), HTTP API (v2), Function URL and ALB events: through Mangum.
- Direct invocations (`aws lambda invoke`, `sam local invoke -e`): the documented payload
  `{"path": "/generate", "method": "POST", "body": {...}, "headers": {...}, "query": {...}}`,
  answered with `{"statusCode": 200, "headers": {...}, "body": {...}}`.
- Warm-up pings (`{"warmup": true}` or an EventBridge scheduled event): answered at once.

Generation gets a deadline before the invocation's remaining time, and before API Gateway's
29 s integration timeout, so it ends with `finish_reason: "time"` instead of a 502/504.
"""

from __future__ import annotations

import time

_IMPORTS_STARTED = time.perf_counter()

# The S3 fetch needs only boto3: start it now, so the download overlaps the torch and transformers
# imports below instead of following them. The engine's load picks up this prefetch.
from function.config import get_settings  # noqa: E402
from function.fetch import prefetch  # noqa: E402

settings = get_settings()
if settings.model_path and settings.model_path.startswith("s3://"):
    prefetch(settings.model_path, settings.model_cache_dir)

import base64  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402
from urllib.parse import urlencode  # noqa: E402

from aws_lambda_powertools import Logger, Metrics  # noqa: E402
from aws_lambda_powertools.metrics import MetricUnit  # noqa: E402
from mangum import Mangum  # noqa: E402
from starlette.types import ASGIApp, Receive, Scope, Send  # noqa: E402

from function.app import create_app  # noqa: E402
from function.auth import with_secret_keys  # noqa: E402
from function.engine import deadline_in, get_engine  # noqa: E402
from function.loading import import_runtime  # noqa: E402
from function.observability import NAMESPACE  # noqa: E402

import_runtime()  # torch and transformers' model-loading modules, while the weights download
IMPORTS_SECONDS = time.perf_counter() - _IMPORTS_STARTED


def resident_mb() -> float | None:
    """This process's resident memory now (Linux)."""
    try:
        status = Path("/proc/self/status").read_text(encoding="utf-8")
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return round(int(line.split()[1]) / 1024, 1) if line else None


API_GATEWAY_TIMEOUT_S = 29.0
LAMBDA_PAYLOAD_LIMIT = 6 * 1024 * 1024
PAYLOAD_HEADROOM = 16 * 1024  # the runtime's own envelope around our response
SAFETY_MARGIN_S = 1.5  # tokenizing, decoding and returning the response after generation stops

settings = with_secret_keys(settings)  # API keys from Secrets Manager, read once, at init
logging.basicConfig(level=settings.log_level.upper())
logging.getLogger().setLevel(settings.log_level.upper())
engine = get_engine(
    settings,
    startup_phases={
        "began": _IMPORTS_STARTED,
        "imports_s": round(IMPORTS_SECONDS, 4),
        "rss_after_imports_mb": resident_mb(),
    },
)
powertools_logger = Logger(service="llm-function")
lambda_metrics = Metrics(namespace=NAMESPACE, service="llm-function")
warnings.filterwarnings("ignore", message="No application metrics to publish")  # warm pings add none


def record_request(entry: dict[str, Any]) -> None:
    """Each request: one JSON log line through Powertools, and its generation as EMF metrics."""
    powertools_logger.info("request", extra={key: value for key, value in entry.items() if key != "message"})
    if "generation_s" in entry:
        lambda_metrics.add_metric(
            name="TokensGenerated", unit=MetricUnit.Count, value=entry["completion_tokens"]
        )
        lambda_metrics.add_metric(
            name="GenerationSeconds", unit=MetricUnit.Seconds, value=entry["generation_s"]
        )


app = create_app(settings, engine, request_sink=record_request)
_cold_start_metrics_pending = True


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


asgi_handler = Mangum(StageRootPath(app), lifespan="off")


@lambda_metrics.log_metrics(capture_cold_start_metric=True)
@powertools_logger.inject_lambda_context
def handler(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """Route one Lambda event to the app; see the module docstring for the accepted shapes."""
    record_cold_start_metrics()
    return route_event(event, context)


def record_cold_start_metrics() -> None:
    """The start-up phases as metrics, once per environment (with its first invocation)."""
    global _cold_start_metrics_pending
    phases = engine.cold_start()
    if not _cold_start_metrics_pending or phases is None:
        return
    _cold_start_metrics_pending = False
    lambda_metrics.add_metric(name="LoadSeconds", unit=MetricUnit.Seconds, value=phases["load_s"])
    lambda_metrics.add_metric(name="FetchSeconds", unit=MetricUnit.Seconds, value=phases["fetch_s"])
    if phases.get("fetch_mb_per_s"):
        lambda_metrics.add_metric(
            name="FetchMBps", unit=MetricUnit.MegabytesPerSecond, value=phases["fetch_mb_per_s"]
        )


def route_event(event: dict[str, Any], context: Any) -> dict[str, Any]:
    if is_warmup(event):
        return {"warmup": True, "model_loaded": engine.current is not None}
    if "requestContext" in event:
        with deadline_in(generation_budget(event, context)):
            return within_payload_limit(asgi_handler(event, context), direct=False)
    if isinstance(event.get("path"), str):
        malformed = next(
            (
                name
                for name, kind in (("method", str), ("headers", dict), ("query", dict))
                if event.get(name) is not None and not isinstance(event[name], kind)
            ),
            None,
        )
        if malformed is not None:
            return bad_event(
                f"direct payload: {malformed} must be a JSON "
                f"{'string' if malformed == 'method' else 'object'}",
                malformed,
            )
        with deadline_in(generation_budget(event, context)):
            return within_payload_limit(invoke_direct(event, context), direct=True)
    return bad_event(
        "unsupported event: send an API Gateway, Function URL or ALB event, a direct payload "
        '{"path", "method", "body", "headers", "query"}, or {"warmup": true}',
        None,
    )


def bad_event(message: str, field: str | None) -> dict[str, Any]:
    """An event the handler can't route: a 400 in the one error shape."""
    details = [{"field": field, "message": message, "limit": None}] if field else []
    return {
        "statusCode": 400,
        "headers": {"content-type": "application/json"},
        "body": {
            "error": {"code": "unsupported_event", "status": 400, "message": message, "details": details}
        },
    }


def within_payload_limit(response: dict[str, Any], *, direct: bool) -> dict[str, Any]:
    """Lambda refuses responses over 6 MB (a 502 at the caller): answer 413 with the reason instead."""
    size = len(json.dumps(response, ensure_ascii=False).encode("utf-8"))
    if size <= LAMBDA_PAYLOAD_LIMIT - PAYLOAD_HEADROOM:
        return response
    error = {
        "error": {
            "code": "payload_too_large",
            "status": 413,
            "message": (
                f"the response would be {size} bytes, over Lambda's 6 MB payload limit: ask for fewer "
                "or shorter sequences (num_return_sequences, max_new_tokens) or a shorter prompt"
            ),
            "details": [{"field": None, "message": "response too large", "limit": LAMBDA_PAYLOAD_LIMIT}],
        }
    }
    headers = {"content-type": "application/json"}
    if direct:
        return {"statusCode": 413, "headers": headers, "body": error}
    return {"statusCode": 413, "headers": headers, "body": json.dumps(error), "isBase64Encoded": False}


def is_warmup(event: dict[str, Any]) -> bool:
    if event.get("warmup") is True:
        return True
    return event.get("source") == "aws.events" and event.get("detail-type") == "Scheduled Event"


def generation_budget(event: dict[str, Any], context: Any) -> float | None:
    """Seconds generation may run: before the function's timeout, and API Gateway's 29 s."""
    budgets: list[float] = []
    remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
    if callable(remaining_ms):
        budgets.append(remaining_ms() / 1000 - SAFETY_MARGIN_S)
    request_context = event.get("requestContext") or {}
    behind_api_gateway = "apiId" in request_context and ".lambda-url." not in str(
        request_context.get("domainName", "")
    )
    if behind_api_gateway:
        started_ms = request_context.get("requestTimeEpoch") or request_context.get("timeEpoch")
        waited = time.time() - started_ms / 1000 if isinstance(started_ms, int | float) else 0.0
        if not 0 <= waited < API_GATEWAY_TIMEOUT_S:
            waited = 0.0  # a stored test event's old timestamp: API Gateway would have given up already
        budgets.append(API_GATEWAY_TIMEOUT_S - waited - SAFETY_MARGIN_S)
    return min(budgets) if budgets else None


def invoke_direct(event: dict[str, Any], context: Any) -> dict[str, Any]:
    """A direct payload through the same app (same validation), as an HTTP API v2 request."""
    response = asgi_handler(direct_to_http_event(event, context), context)
    body = response.get("body") or ""
    if response.get("isBase64Encoded"):
        body = base64.b64decode(body).decode("utf-8", errors="replace")
    try:
        parsed: Any = json.loads(body) if body else None
    except ValueError:
        parsed = body
    return {"statusCode": response["statusCode"], "headers": response.get("headers", {}), "body": parsed}


def direct_to_http_event(event: dict[str, Any], context: Any) -> dict[str, Any]:
    path = "/" + str(event["path"]).lstrip("/")
    method = str(event.get("method") or event.get("httpMethod") or "GET").upper()
    headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
    body = event.get("body")
    if body is not None and not isinstance(body, str):
        body = json.dumps(body)
        headers.setdefault("content-type", "application/json")
    query = event.get("query") or event.get("queryStringParameters") or {}
    request_id = getattr(context, "aws_request_id", "direct-invoke")
    return {
        "version": "2.0",
        "routeKey": "$default",
        "rawPath": path,
        "rawQueryString": urlencode(query, doseq=True),
        "headers": {"host": "lambda.direct", **headers},
        "requestContext": {
            "http": {
                "method": method,
                "path": path,
                "protocol": "HTTP/1.1",
                "sourceIp": "127.0.0.1",
                "userAgent": headers.get("user-agent", "direct-invoke"),
            },
            "requestId": request_id,
            "routeKey": "$default",
            "stage": "$default",
            "timeEpoch": int(time.time() * 1000),
        },
        "body": body,
        "isBase64Encoded": False,
    }
