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
