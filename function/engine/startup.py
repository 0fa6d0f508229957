"""The start-up model: MODEL_PATH loaded once at start, its failure kept for /health, and retried.

A part of `Engine` (its base class), kept apart so the engine module stays readable: the retry
runs at most once per LOAD_RETRY_INTERVAL_S, in the request's thread or (for /health, which
never waits) in a thread of its own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from function.config import Settings
from function.engine.telemetry import ColdStartTelemetry
from function.engine.types import Quantization
from function.errors import ModelLoadError, ModelLoadInProgressError
from function.weights.loading import quantization_from_flags

if TYPE_CHECKING:
    from function.weights.loading import LoadedModel

logger = logging.getLogger(__name__)


class EngineState(Protocol):
    """What the start-up loading needs of the engine it is part of."""

    settings: Settings
    telemetry: ColdStartTelemetry
    _startup_error: str | None
    _last_startup_attempt: float | None
    _retry_lock: threading.Lock

    @property
    def current(self) -> LoadedModel | None: ...

    @property
    def loading(self) -> bool: ...

    def load(
        self,
        model_path: str,
        quantization: Quantization = "none",
        *,
        base_model_path: str | None = None,
        adapters: dict[str, str] | None = None,
        check_path: Callable[[str], None] | None = None,
    ) -> tuple[LoadedModel, LoadedModel | None]: ...

    def load_startup_model(self) -> None: ...

    def _retry_due(self) -> bool: ...


class StartupLoading:
    """`Engine`'s start-up loading (a base class of it; see the module docstring)."""

    _startup_error: str | None = None
    _last_startup_attempt: float | None = None

    def _not_loaded_reason(self: EngineState) -> str:
        if self._startup_error is not None:
            return f"the start-up model failed to load: {self._startup_error}"
        if self.settings.model_path is None:
            return "no model configured: set MODEL_PATH or call /load_model"
        return "the model has not been loaded yet"

    def load_startup_model(self: EngineState) -> None:
        """Load MODEL_PATH if set; a failure is recorded for /health, never raised."""
        if self.settings.model_path is None or self.current is not None:
            return
        self._last_startup_attempt = time.monotonic()
        quantization = quantization_from_flags(self.settings.load_in_8bit, self.settings.load_in_4bit)
        try:
            loaded, _ = self.load(
                self.settings.model_path,
                quantization,
                base_model_path=self.settings.base_model_path,
                adapters=self.settings.adapters,
            )
            self.telemetry.record_load(loaded)
        except ModelLoadInProgressError:
            return
        except ModelLoadError as exc:
            self._startup_error = exc.message
            logger.error("start-up model load failed: %s", exc.message)

    def _retry_due(self: EngineState) -> bool:
        if self.current is not None or self.settings.model_path is None or self.loading:
            return False
        last = self._last_startup_attempt
        return last is None or time.monotonic() - last >= self.settings.load_retry_interval_s

    def ensure_loaded(self: EngineState) -> None:
        """Retry a failed start-up load, at most once per `load_retry_interval_s` (here, waiting for it)."""
        if self._retry_due():
            self.load_startup_model()

    def ensure_loaded_in_background(self: EngineState) -> None:
        """`ensure_loaded` in a thread of its own, without waiting for it: for /health, which answers at once
        from `status()` ("loading" while the retry runs)."""
        if not self._retry_due() or not self._retry_lock.acquire(blocking=False):
            return

        def retry() -> None:
            try:
                self.load_startup_model()
            finally:
                self._retry_lock.release()

        threading.Thread(target=retry, name="start-up-load-retry", daemon=True).start()
