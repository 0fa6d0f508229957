"""The shape of an HTTP event, checked before Mangum translates it into an ASGI request.

Mangum trusts its events: a missing `httpMethod`, a list of headers, a dict body or invalid base64
raise KeyError, TypeError or binascii.Error out of the handler (the runtime then answers a stack
trace), and a method or header of the wrong JSON type reaches the app as a 500. `check_http_event`
mirrors what Mangum reads, for the kinds it infers (in its order: ALB, HTTP API or Function URL,
REST API), and raises a `MalformedEventError` that names the field instead.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

from function.errors import MalformedEventError

UNKNOWN_EVENT = (
    "unrecognised HTTP event: an API Gateway REST event has `resource`, an HTTP API or Function URL "
    "event `version`, an ALB event `requestContext.elb`"
)
MAX_FIELD_NAME = 64  # an event's own keys go into the error's field name: keep them short


def field_name(container: str, key: Any) -> str:
    return f"{container}.{str(key)[:MAX_FIELD_NAME]}"


def is_text(value: Any) -> bool:
    """A JSON string that can go on the wire: UTF-8 encodable (no lone surrogates from a `\\ud800`)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def require_text(value: Any, field: str) -> str:
    if not is_text(value):
        raise MalformedEventError(f"{field} must be a string", field=field)
    text: str = value
    return text


def optional_object(event: dict[str, Any], key: str, field: str, *, nullable: bool = True) -> dict[str, Any]:
    """`event[key]` as a JSON object; absent (or null, where Mangum allows it) as an empty one."""
    if key not in event or (nullable and event[key] is None):
        return {}
    value = event[key]
    if not isinstance(value, dict):
        raise MalformedEventError(f"{field} must be a JSON object", field=field)
    return value


def require_object(container: dict[str, Any], key: str, field: str) -> dict[str, Any]:
    value = container.get(key)
    if not isinstance(value, dict):
        raise MalformedEventError(f"{field} must be a JSON object", field=field)
    return value


def string_map(value: dict[str, Any], field: str) -> dict[str, str]:
    """An object whose every value is a string: `headers`, `queryStringParameters`."""
    for key, item in value.items():
        require_text(key, field)
        if not is_text(item):
            name = field_name(field, key)
            raise MalformedEventError(f"{name} must be a string", field=name)
    return value


def string_list_map(value: dict[str, Any], field: str) -> dict[str, list[str]]:
    """An object whose every value is a list of strings: `multiValueHeaders`, `multiValue…Parameters`."""
    for key, items in value.items():
        require_text(key, field)
        if not isinstance(items, list) or not all(is_text(item) for item in items):
            name = field_name(field, key)
            raise MalformedEventError(f"{name} must be a list of strings", field=name)
    return value


def is_port(text: str) -> bool:
    try:
        int(text)  # as Mangum reads it
    except ValueError:
        return False
    return True


def check_server(headers: dict[str, str]) -> None:
    """Mangum reads the server from `host` (`name` or `name:port`) and `x-forwarded-port`."""
    host = headers.get("host", "")
    if ":" in host:
        parts = host.split(":")
        if len(parts) != 2 or not is_port(parts[1]):
            raise MalformedEventError("headers.host must be a host name, or host:port", field="headers.host")
    elif not is_port(headers.get("x-forwarded-port", "80")):
        field = "headers.x-forwarded-port"
        raise MalformedEventError(f"{field} must be a port number", field=field)


def check_body(event: dict[str, Any]) -> None:
    encoded = event.get("isBase64Encoded")
    if encoded is not None and not isinstance(encoded, bool):
        raise MalformedEventError("isBase64Encoded must be true or false", field="isBase64Encoded")
    body = event.get("body")
    if body is None:
        return
    if not isinstance(body, str):
        message = "body must be a string (base64 when isBase64Encoded is true), not a JSON " + type_name(body)
        raise MalformedEventError(message, field="body")
    if not encoded:
        require_text(body, "body")
        return
    try:
        base64.b64decode(body)  # as Mangum decodes it
    except (binascii.Error, ValueError):
        raise MalformedEventError(
            "body is not valid base64, and isBase64Encoded is true", field="body"
        ) from None


def type_name(value: Any) -> str:
    if isinstance(value, dict):
        return "object"
    if isinstance(value, list):
        return "array"
    if isinstance(value, bool):
        return "boolean"
    return "number" if isinstance(value, int | float) else "value"


def check_http_api_v2(event: dict[str, Any], request_context: dict[str, Any]) -> None:
    """HTTP API payload 2.0 and Function URLs: method, path and source IP under requestContext.http."""
    http = require_object(request_context, "http", "requestContext.http")
    for key in ("method", "path", "sourceIp"):
        require_text(http.get(key), f"requestContext.http.{key}")
    headers = string_map(optional_object(event, "headers", "headers", nullable=False), "headers")
    if "rawQueryString" in event:
        require_text(event["rawQueryString"], "rawQueryString")
    cookies = event.get("cookies")
    if cookies is not None and not (isinstance(cookies, list) and all(is_text(c) for c in cookies)):
        raise MalformedEventError("cookies must be a list of strings", field="cookies")
    check_server({key.lower(): value for key, value in headers.items()})


def check_query(event: dict[str, Any]) -> None:
    string_map(
        optional_object(event, "queryStringParameters", "queryStringParameters"), "queryStringParameters"
    )
    field = "multiValueQueryStringParameters"
    string_list_map(optional_object(event, field, field), field)


def check_rest(event: dict[str, Any], request_context: dict[str, Any]) -> None:
    """API Gateway REST (and HTTP API payload 1.0): method and path at the top, headers single or multi."""
    require_text(event.get("httpMethod"), "httpMethod")
    require_text(event.get("path"), "path")
    headers = string_map(optional_object(event, "headers", "headers"), "headers")
    multi = string_list_map(
        optional_object(event, "multiValueHeaders", "multiValueHeaders"), "multiValueHeaders"
    )
    check_query(event)
    identity = optional_object(request_context, "identity", "requestContext.identity", nullable=False)
    if identity.get("sourceIp") is not None:
        require_text(identity["sourceIp"], "requestContext.identity.sourceIp")
    merged = {key.lower(): value for key, value in headers.items()}
    merged.update({key.lower(): ", ".join(values) for key, values in multi.items()})
    check_server(merged)


def check_alb(event: dict[str, Any]) -> None:
    """ALB: method and path at the top; `multiValueHeaders` if its target group enables them, or `headers`."""
    require_text(event.get("httpMethod"), "httpMethod")
    require_text(event.get("path"), "path")
    merged: dict[str, str] = {}
    if "multiValueHeaders" in event:
        multi = optional_object(event, "multiValueHeaders", "multiValueHeaders", nullable=False)
        for key, values in string_list_map(multi, "multiValueHeaders").items():
            if values:
                merged[key.lower()] = values[-1]
    else:
        if "headers" not in event:
            raise MalformedEventError(
                "an ALB event must have headers (or multiValueHeaders)", field="headers"
            )
        headers = string_map(optional_object(event, "headers", "headers", nullable=False), "headers")
        merged = {key.lower(): value for key, value in headers.items()}
    check_query(event)
    check_server(merged)


def check_http_event(event: dict[str, Any]) -> None:
    """Raise `MalformedEventError` (naming the field) for an event Mangum cannot turn into a request."""
    request_context = event.get("requestContext")
    if not isinstance(request_context, dict):
        raise MalformedEventError("requestContext must be a JSON object", field="requestContext")
    if "elb" in request_context:
        check_alb(event)
    elif "version" in event:
        if event["version"] == "2.0":
            check_http_api_v2(event, request_context)
        else:
            check_rest(event, request_context)
    elif "resource" in event:
        check_rest(event, request_context)
    else:
        raise MalformedEventError(UNKNOWN_EVENT, field="requestContext")
    check_body(event)
