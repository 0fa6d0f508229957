"""The one error path: every error body is built here, in the shape of its route family.

Our routes answer `{"error": {"code", "message", "status", "details"}}` (`ErrorResponse`); the
OpenAI-compatible routes (`/v1/…`) answer OpenAI's `{"error": {"message", "type", "param", "code"}}`.
The app's exception handlers, the body-size middleware and the Lambda handler (malformed
events, the response payload limit) all come through `error_content`/`error_response`.
500 is kept for bugs.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from function.api.schemas import ErrorDetail, ErrorInfo, ErrorResponse
from function.errors import LLMFunctionError

logger = logging.getLogger(__name__)

ERROR_STATUSES = (400, 401, 403, 409, 413, 415, 422, 429, 431, 500, 503)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in ERROR_STATUSES}
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}
_UNION_LABEL = re.compile(r"[\[\]()-]")
JSON_BODY_HINT = "send a JSON body with Content-Type: application/json"
# Who may call a route, checked when an error would otherwise answer before the route's dependencies
# (the body is parsed first): `Admit` raises the domain error (401, 403, 429) the dependency would.
Admit = Callable[[Request], None]
Handler = Callable[[Request, Exception], Awaitable[JSONResponse]]


def is_openai_path(path: str) -> bool:
    """The OpenAI-compatible route family: `/v1` and everything under it."""
    return path == "/v1" or path.startswith("/v1/")


def route_path(scope: Any) -> str:
    """The request's path within the app: without the root path (a REST API stage, say)."""
    path, root = str(scope.get("path", "")), str(scope.get("root_path", ""))
    return path[len(root) :] if root and path.startswith(root) else path


def openai_error_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    return "invalid_request_error" if status < 500 else "server_error"


@dataclass(frozen=True)
class ErrorContent:
    """An error as it leaves: status, JSON body, headers."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str]


def error_content(
    status: int,
    code: str,
    message: str,
    details: list[ErrorDetail] | None = None,
    *,
    path: str = "",
    headers: dict[str, str] | None = None,
) -> ErrorContent:
    """The body for `path`'s route family (ours unless it is under /v1)."""
    details = details or []
    body: dict[str, Any]
    if is_openai_path(path):
        param = details[0].field if details else None
        body = {
            "error": {"message": message, "type": openai_error_type(status), "param": param, "code": code}
        }
    else:
        error = ErrorInfo(code=code, message=message, status=status, details=details)
        body = ErrorResponse(error=error).model_dump()
    return ErrorContent(status, body, dict(headers or {}))


def domain_error_content(exc: LLMFunctionError, *, path: str = "") -> ErrorContent:
    """A domain error (which carries its code and status) as it leaves for `path`."""
    detail = ErrorDetail(field=exc.field, message=exc.message, limit=exc.limit)
    return error_content(exc.status, exc.code, exc.message, [detail], path=path, headers=exc.headers())


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[ErrorDetail] | None = None,
    *,
    path: str = "",
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return as_response(error_content(status, code, message, details, path=path, headers=headers))


def as_response(content: ErrorContent) -> JSONResponse:
    return JSONResponse(status_code=content.status, content=content.body, headers=content.headers or None)


def _field_name(location: tuple[Any, ...] | list[Any]) -> str:
    """The dotted field: without the location ("body") and the labels pydantic gives the members of a
    union (`stop`'s "constrained-str", "list[…]"), which are not fields."""
    parts = [
        str(part)
        for part in location
        if part not in ("body", "query", "path", "header")
        and not (isinstance(part, str) and _UNION_LABEL.search(part))
    ]
    return ".".join(parts) or "body"


def _validation_detail(error: dict[str, Any]) -> ErrorDetail:
    context = error.get("ctx") or {}
    limit = next(
        (context[key] for key in ("le", "ge", "lt", "gt", "max_length", "min_length") if key in context), None
    )
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return ErrorDetail(
        field=_field_name(error.get("loc", ())),
        message=message,
        limit=limit if isinstance(limit, int | float | str) else None,
    )


async def on_domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LLMFunctionError)
    return as_response(domain_error_content(exc, path=route_path(request.scope)))


def is_json_content_type(value: str | None) -> bool:
    """application/json (any parameters, e.g. charset) or an application/…+json type, as FastAPI reads."""
    media = (value or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def _unsupported_media_type(content_type: str | None, path: str) -> JSONResponse:
    got = f"this request's is {content_type[:100]!r}" if content_type else "this request has none"
    detail = ErrorDetail(field="Content-Type", message=f"must be application/json; {got}")
    message = f"the request body must be JSON: {JSON_BODY_HINT} ({got})"
    return error_response(415, "unsupported_media_type", message, [detail], path=path)


def _invalid_json(reason: str, path: str) -> JSONResponse:
    detail = ErrorDetail(field="body", message=reason)
    message = f"the request body is not valid UTF-8 JSON: {reason}"
    return error_response(400, "invalid_json", message, [detail], path=path)


def precedes_dependencies(exc: Exception) -> bool:
    """Errors FastAPI raises while it reads the body, before the route's dependencies (the API key) run:
    malformed JSON, and a body it could not decode (400)."""
    if isinstance(exc, RequestValidationError):
        return any(error.get("type") == "json_invalid" for error in exc.errors())
    return isinstance(exc, StarletteHTTPException) and exc.status_code == 400 and exc.__cause__ is not None


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    path = route_path(request.scope)
    malformed = next((error for error in errors if error.get("type") == "json_invalid"), None)
    if malformed is not None:
        reason = str((malformed.get("ctx") or {}).get("error") or "malformed JSON")
        where = malformed.get("loc", ())[-1:]
        at = f" at character {where[0]}" if where and isinstance(where[0], int) else ""
        return _invalid_json(f"{reason}{at}", path)
    content_type = request.headers.get("content-type")
    if isinstance(exc.body, bytes) and exc.body and not is_json_content_type(content_type):
        # FastAPI keeps a non-JSON body as bytes, which then fails the model: say what to send instead.
        return _unsupported_media_type(content_type, path)
    details = [_validation_detail(error) for error in errors]
    summary = "; ".join(f"{d.field}: {d.message}" for d in details)
    return error_response(422, "invalid_request", summary, details, path=path)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    path = route_path(request.scope)
    if precedes_dependencies(exc):  # FastAPI could not read the body as JSON
        if isinstance(exc.__cause__, UnicodeDecodeError):
            return _invalid_json("its bytes are not UTF-8; encode the JSON as UTF-8", path)
        if isinstance(exc.__cause__, RecursionError):
            return _invalid_json("it is nested too deeply", path)
        return _invalid_json("it could not be decoded", path)
    code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
    headers = getattr(exc, "headers", None)
    return error_response(exc.status_code, code, str(exc.detail), path=path, headers=headers)


async def on_bug(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    message = "internal error; the server log has the details"
    return error_response(500, "internal_error", message, path=route_path(request.scope))


def admitted_first(handler: Handler, admit: Admit) -> Handler:
    """`handler`, but for errors raised before the route's dependencies ran, the caller is admitted first:
    a missing or wrong key gets its 401 (and counts against the rate limit) whatever the body."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        if precedes_dependencies(exc):
            try:
                admit(request)
            except LLMFunctionError as refused:
                return await on_domain_error(request, refused)
        return await handler(request, exc)

    return handle


def install_error_handlers(app: FastAPI, admit: Admit | None = None) -> None:
    """Every error, ours or the framework's, leaves through `error_content`; 500 is kept for bugs.

    `admit` (the routes' key check and rate limit) runs first for errors found while reading the body."""
    on_validation: Handler = on_validation_error
    on_http: Handler = on_http_error
    if admit is not None:
        on_validation, on_http = admitted_first(on_validation, admit), admitted_first(on_http, admit)
    app.add_exception_handler(LLMFunctionError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_bug)
