"""The start-up model: MODEL_PATH loaded once at start, warmed up, its failure kept for /health, and
retried.

A part of `Engine` (its base class), kept apart so the engine module stays readable: the retry
runs at most once per LOAD_RETRY_INTERVAL_S, in the request's thread or (for /health, which
never waits) in a thread of its own. The warm-up (WARM_UP) is one short greedy generation right after
the load, so the first user does not pay for first-call work (allocator, kernels, a TORCH_COMPILE
compile, tokenizer caches); under SnapStart it runs before the snapshot (`function.aws.snapstart`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from function.config import Settings
from function.engine.telemetry import ColdStartTelemetry
from function.engine.types import Quantization, SamplingParams
from function.errors import ModelLoadError, ModelLoadInProgressError
from function.weights.loading import quantization_from_flags

if TYPE_CHECKING:
    from function.weights.loading import LoadedModel

logger = logging.getLogger(__name__)

WARM_UP_PROMPT = "Hello"
WARM_UP_PARAMS = SamplingParams(max_new_tokens=4, do_sample=False, temperature=0.0, repetition_penalty=1.0)


class EngineState(Protocol):
    """What the start-up loading needs of the engine it is part of."""

    settings: Settings
    telemetry: ColdStartTelemetry
    _startup_error: str | None
    _last_startup_attempt: float | None
    _retry_lock: threading.Lock
    _generate_lock: threading.Lock

    @property
    def compiled(self) -> bool: ...

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

    def warm_up(self) -> float | None: ...


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
            return
        if self.settings.warms_up:
            self.warm_up()

    def warm_up(self: EngineState) -> float | None:
        """One short greedy generation on the served model, outside the response cache, the batcher and
        the first-token telemetry; returns its seconds (also in the cold-start phases), or None when no
        model is loaded. A failure is logged, never raised: the model still serves."""
        from function.engine.generation import run_batch
        from function.engine.limits import encode_prompt
        from function.engine.torch_thread import on_generation_thread

        loaded = self.current
        if loaded is None:
            return None
        started = time.perf_counter()
        try:
            encoded, _ = encode_prompt(
                loaded, WARM_UP_PROMPT, WARM_UP_PARAMS, self.settings, add_special_tokens=True
            )
            with self._generate_lock:
                on_generation_thread(
                    run_batch, loaded, [(encoded, WARM_UP_PARAMS)], None, compiled=self.compiled
                )
        except Exception:  # a warm-up is an optimisation: its failure must not take the model down
            logger.exception("warm-up generation failed; the first request will pay the first-call costs")
            return None
        seconds = time.perf_counter() - started
        self.telemetry.record_warm_up(seconds)
        return seconds

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
