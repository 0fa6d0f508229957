"""The one error path: every error body is built here, in the shape of its route family.

Our routes answer `{"error": {"code", "message", "status", "details"}}` (`ErrorResponse`); the
OpenAI-compatible routes (`/v1/…`) answer OpenAI's `{"error": {"message", "type", "param", "code"}}`.
The app's exception handlers, the body-size middleware and the Lambda handler (malformed
events, the response payload limit) all come through `error_content`/`error_response`.
500 is kept for bugs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from function.api.schemas import ErrorDetail, ErrorInfo, ErrorResponse
from function.errors import LLMFunctionError

logger = logging.getLogger(__name__)

ERROR_STATUSES = (400, 401, 403, 409, 413, 422, 429, 500, 503)
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in ERROR_STATUSES}
HTTP_ERROR_CODES = {404: "not_found", 405: "method_not_allowed"}


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
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
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


async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    path = route_path(request.scope)
    if any(error.get("type") == "json_invalid" for error in errors):
        detail = ErrorDetail(field="body", message="malformed JSON")
        return error_response(400, "invalid_json", "the request body is not valid JSON", [detail], path=path)
    details = [_validation_detail(error) for error in errors]
    summary = "; ".join(f"{d.field}: {d.message}" for d in details)
    return error_response(422, "invalid_request", summary, details, path=path)


async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = HTTP_ERROR_CODES.get(exc.status_code, "http_error")
    headers = getattr(exc, "headers", None)
    return error_response(
        exc.status_code, code, str(exc.detail), path=route_path(request.scope), headers=headers
    )


async def on_bug(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error")
    message = "internal error; the server log has the details"
    return error_response(500, "internal_error", message, path=route_path(request.scope))


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, leaves through `error_content`; 500 is kept for bugs."""
    app.add_exception_handler(LLMFunctionError, on_domain_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    app.add_exception_handler(Exception, on_bug)
