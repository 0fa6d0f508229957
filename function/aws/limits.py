"""What Lambda and API Gateway impose: the time an invocation has, and the 6 MB response payload."""

from __future__ import annotations

import json
import time
from typing import Any

from function.api.errors import domain_error_content
from function.errors import PayloadTooLargeError

API_GATEWAY_TIMEOUT_S = 29.0
LAMBDA_PAYLOAD_LIMIT = 6 * 1024 * 1024
PAYLOAD_HEADROOM = 16 * 1024  # the runtime's own envelope around our response
SAFETY_MARGIN_S = 1.5  # tokenizing, decoding and returning the response after generation stops


def generation_budget(event: dict[str, Any], context: Any) -> float | None:
    """Seconds generation may run: before the function's timeout, and API Gateway's 29 s."""
    budgets: list[float] = []
    remaining_ms = getattr(context, "get_remaining_time_in_millis", None)
    if callable(remaining_ms):
        budgets.append(remaining_ms() / 1000 - SAFETY_MARGIN_S)
    request_context = event.get("requestContext")
    if not isinstance(request_context, dict):
        request_context = {}
    behind_api_gateway = "apiId" in request_context and ".lambda-url." not in str(
        request_context.get("domainName", "")
    )
    if behind_api_gateway:
        started_ms = request_context.get("requestTimeEpoch") or request_context.get("timeEpoch")
        budgets.append(API_GATEWAY_TIMEOUT_S - waited_s(started_ms) - SAFETY_MARGIN_S)
    return min(budgets) if budgets else None


def waited_s(started_ms: Any) -> float:
    """Seconds since API Gateway received the request (`requestTimeEpoch`/`timeEpoch`, in ms). Only a
    time within the last 29 s counts: a stored test event's old timestamp, or an absurd one (inf after
    JSON's 1e400, a 400-digit integer, NaN, a string), is ignored: 0."""
    if isinstance(started_ms, bool) or not isinstance(started_ms, int | float):
        return 0.0
    now_ms = time.time() * 1000
    # Compared before any arithmetic: Python compares a huge int with a float exactly, without overflow.
    if not now_ms - API_GATEWAY_TIMEOUT_S * 1000 < started_ms <= now_ms:
        return 0.0
    return (now_ms - float(started_ms)) / 1000


def within_payload_limit(response: dict[str, Any], *, path: str, direct: bool) -> dict[str, Any]:
    """Lambda refuses responses over 6 MB (a 502 at the caller): answer 413 with the reason instead,
    in the shape of `path`'s route family."""
    size = len(json.dumps(response, ensure_ascii=False).encode("utf-8"))
    if size <= LAMBDA_PAYLOAD_LIMIT - PAYLOAD_HEADROOM:
        return response
    error = PayloadTooLargeError(
        f"the response would be {size} bytes, over Lambda's 6 MB payload limit: ask for fewer "
        "or shorter sequences (num_return_sequences, max_new_tokens) or a shorter prompt",
        limit=LAMBDA_PAYLOAD_LIMIT,
    )
    content = domain_error_content(error, path=path)
    headers = {"content-type": "application/json"}
    if direct:
        return {"statusCode": content.status, "headers": headers, "body": content.body}
    return {
        "statusCode": content.status,
        "headers": headers,
        "body": json.dumps(content.body),
        "isBase64Encoded": False,
    }
