"""Domain errors. The engine raises these; the app maps each to one HTTP status and one body.

Every message is safe to show a client: it names the field and the limit, never a local
path, a traceback or a secret.
"""

from __future__ import annotations

from typing import Any


class LLMFunctionError(Exception):
    """Base class. `code` is the stable machine-readable name clients switch on."""

    code = "error"

    def __init__(self, message: str, *, field: str | None = None, limit: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.limit = limit


class InvalidRequestError(LLMFunctionError):
    """A request value is out of bounds or inconsistent with another."""

    code = "invalid_request"


class ContextLengthExceededError(LLMFunctionError):
    """Prompt tokens plus max_new_tokens do not fit the model's context."""

    code = "context_length_exceeded"


class ModelNotLoadedError(LLMFunctionError):
    """No model is loaded: none configured, or the start-up load failed (the reason says which)."""

    code = "model_not_loaded"


class ModelLoadInProgressError(LLMFunctionError):
    """A second load was asked for while one is running."""

    code = "model_load_in_progress"


class ModelLoadError(LLMFunctionError):
    """The asked-for model could not be loaded; the model being served is unchanged."""

    code = "model_load_failed"
