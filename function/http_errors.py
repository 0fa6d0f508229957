"""Every error leaves through here, with one body: `ErrorResponse`. 500 is kept for bugs."""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from function.errors import (
    ContextLengthExceededError,
    ForbiddenError,
    InvalidRequestError,
    LLMFunctionError,
    ModelLoadError,
    ModelLoadInProgressError,
    ModelNotLoadedError,
    PayloadTooLargeError,
    RateLimitedError,
    StreamingUnavailableError,
    UnauthorizedError,
)
from function.openai_schemas import openai_error
from function.schemas import ErrorDetail, ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[LLMFunctionError], int] = {  # subclasses before their parents: first match wins
    StreamingUnavailableError: 400,
    InvalidRequestError: 422,
    ContextLengthExceededError: 413,
    ModelNotLoadedError: 503,
    ModelLoadInProgressError: 409,
    ModelLoadError: 400,
    UnauthorizedError: 401,
    ForbiddenError: 403,
    PayloadTooLargeError: 413,
    RateLimitedError: 429,
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 413, 422, 429, 500, 503)
}


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[ErrorDetail] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(code=code, message=message, status=status, details=details or []))
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


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


def error_headers(exc: LLMFunctionError, status: int) -> dict[str, str] | None:
    if isinstance(exc, RateLimitedError):
        return {"Retry-After": str(exc.retry_after)}
    if status == 503:
        return {"Retry-After": "5"}
    if status == 401:
        return {"WWW-Authenticate": 'Bearer realm="llm-function"'}
    return None


def for_route(request: Request, response: JSONResponse) -> JSONResponse:
    """The OpenAI-compatible routes (/v1/…) answer errors in OpenAI's shape; the others in ours."""
    if not request.url.path.startswith("/v1/"):
        return response
    ours = json.loads(bytes(response.body))["error"]
    field = ours["details"][0]["field"] if ours["details"] else None
    body = openai_error(ours["status"], ours["message"], field, ours["code"])
    headers = {
        k: v for k, v in response.headers.items() if k.lower() in ("retry-after", "www-authenticate", "allow")
    }
    return JSONResponse(status_code=response.status_code, content=body, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, leaves as `ErrorResponse`; 500 is kept for bugs."""

    @app.exception_handler(LLMFunctionError)
    async def on_domain_error(request: Request, exc: LLMFunctionError) -> JSONResponse:
        status = next((code for kind, code in STATUS_BY_ERROR.items() if isinstance(exc, kind)), 500)
        detail = ErrorDetail(field=exc.field, message=exc.message, limit=exc.limit)
        headers = error_headers(exc, status)
        return for_route(request, error_response(status, exc.code, exc.message, [detail], headers))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(error.get("type") == "json_invalid" for error in errors):
            detail = ErrorDetail(field="body", message="malformed JSON")
            return for_route(
                request, error_response(400, "invalid_json", "the request body is not valid JSON", [detail])
            )
        details = [_validation_detail(error) for error in errors]
        summary = "; ".join(f"{d.field}: {d.message}" for d in details)
        return for_route(request, error_response(422, "invalid_request", summary, details))

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = getattr(exc, "headers", None)
        return for_route(request, error_response(exc.status_code, code, str(exc.detail), headers=headers))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return for_route(
            request, error_response(500, "internal_error", "internal error; the server log has the details")
        )
