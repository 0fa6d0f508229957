"""Domain errors. Each carries its stable `code` and its HTTP `status`; the API turns any of them
into one error body (`function.api.errors`), in the shape of the route family.

Every message is safe to show a client: it names the field and the limit, never a local
path, a traceback or a secret.
"""

from __future__ import annotations

from typing import Any


class LLMFunctionError(Exception):
    """Base class. `code` is the stable machine-readable name clients switch on; `status` its HTTP status."""

    code = "error"
    status = 500

    def __init__(self, message: str, *, field: str | None = None, limit: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.limit = limit

    def headers(self) -> dict[str, str] | None:
        """Headers the response must carry (Retry-After, WWW-Authenticate)."""
        return None


class InvalidRequestError(LLMFunctionError):
    """A request value is out of bounds or inconsistent with another."""

    code = "invalid_request"
    status = 422


class StreamingUnavailableError(InvalidRequestError):
    """`stream: true` where responses are buffered (Lambda): a 400 that says to use the server mode."""

    code = "streaming_unavailable"
    status = 400


class UnknownAdapterError(InvalidRequestError):
    """A request names an adapter that is not loaded; the message lists the ones that are."""

    code = "unknown_adapter"


class UnsupportedEventError(InvalidRequestError):
    """A Lambda event the handler cannot route (neither an HTTP event nor a direct payload)."""

    code = "unsupported_event"
    status = 400


class ContextLengthExceededError(LLMFunctionError):
    """Prompt tokens plus max_new_tokens do not fit the model's context."""

    code = "context_length_exceeded"
    status = 413


class PayloadTooLargeError(LLMFunctionError):
    """A request body, prompt or response over its cap."""

    code = "payload_too_large"
    status = 413


class ModelNotLoadedError(LLMFunctionError):
    """No model is loaded: none configured, or the start-up load failed (the reason says which)."""

    code = "model_not_loaded"
    status = 503

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "5"}


class ModelLoadInProgressError(LLMFunctionError):
    """A second load was asked for while one is running."""

    code = "model_load_in_progress"
    status = 409


class ModelLoadError(LLMFunctionError):
    """The asked-for model could not be loaded; the model being served is unchanged."""

    code = "model_load_failed"
    status = 400


class UnauthorizedError(LLMFunctionError):
    """No API key, or one that is not valid."""

    code = "unauthorized"
    status = 401

    def headers(self) -> dict[str, str] | None:
        return {"WWW-Authenticate": 'Bearer realm="llm-function"'}


class ForbiddenError(LLMFunctionError):
    """A valid key that may not do this, or an action this deployment refuses."""

    code = "forbidden"
    status = 403


class ModelPathNotAllowedError(ForbiddenError):
    """/load_model's path is outside ALLOWED_MODEL_PATHS (checked before any I/O)."""

    code = "model_path_not_allowed"


class RateLimitedError(LLMFunctionError):
    """Too many requests for this key or client; `retry_after` seconds until the window frees up."""

    code = "rate_limited"
    status = 429

    def __init__(self, message: str, *, retry_after: int, limit: str) -> None:
        super().__init__(message, limit=limit)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": str(self.retry_after)}


class MalformedEventError(InvalidRequestError):
    """An HTTP event (API Gateway, Function URL, ALB) whose fields are not the shape AWS sends:
    it never reaches the app; the error names the field."""

    code = "malformed_event"
    status = 400


class OverloadedError(LLMFunctionError):
    """Server mode: as many generation requests as MAX_QUEUED_REQUESTS are running or waiting; this one is
    refused at once, before it costs anything, rather than queued without bound."""

    code = "overloaded"
    status = 503

    def headers(self) -> dict[str, str] | None:
        return {"Retry-After": "1"}


class ClientClosedRequestError(LLMFunctionError):
    """The client hung up before its answer was ready: the generation stopped at its next token and the
    request gave up its place. Nobody reads the answer; its log line and metrics show status 499 (nginx's
    "client closed request")."""

    code = "client_closed_request"
    status = 499
