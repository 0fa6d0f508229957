"""The one owner of the model: load, swap, status, and the request paths. Knows nothing of HTTP.

The served model is one immutable `LoadedModel` behind a reference that is replaced whole,
under a lock, only after a new model has loaded completely. A request takes the reference
once and uses it to the end, so requests in flight finish on the model they started with and
a failed load leaves the old model serving.

In server mode at most `settings.queue_limit` generation requests are admitted at once (`admit`),
running or waiting; a request whose client is gone is cancelled (`Cancellation`) and stops at its
next token.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from function.config import Settings
from function.engine.admission import Admission, AdmissionControl
from function.engine.batching import MicroBatcher, batch_key, fit_context
from function.engine.deadline import within_deadline
from function.engine.decoder_choice import load_with_decoder
from function.engine.limits import encode_prompt, validate_limits, validate_messages, validate_stop_tokens
from function.engine.prompts import build_chat_prompt, build_messages_prompt
from function.engine.response_cache import ResponseCache
from function.engine.startup import StartupLoading
from function.engine.streamed import generate_streamed
from function.engine.streaming import TextStream
from function.engine.telemetry import ColdStartTelemetry
from function.engine.torch_thread import in_own_thread, on_generation_thread
from function.engine.types import (
    Cancellation,
    Completion,
    EngineStatus,
    GroupResult,
    Quantization,
    RowResult,
    SamplingParams,
)
from function.errors import (
    ClientClosedRequestError,
    ForbiddenError,
    InvalidRequestError,
    ModelLoadInProgressError,
    ModelNotLoadedError,
    UnknownAdapterError,
)
from function.weights.allowlist import check_model_path, default_allowed_paths
from function.weights.loading import LoadedModel, pick_device

logger = logging.getLogger(__name__)

# What a request cancelled before its `generate` call gets from `_run_group`: nothing (it raises).
NOT_RUN = GroupResult(RowResult([], [], 0), 0.0, 0)


def client_closed() -> ClientClosedRequestError:
    return ClientClosedRequestError("the client closed the request before its answer was ready")


class Engine(StartupLoading):
    """Holds the served model; `load` swaps it atomically, the request paths use a snapshot of it."""

    def __init__(
        self, settings: Settings, *, device: str | None = None, startup_phases: dict[str, Any] | None = None
    ) -> None:
        self.settings = settings
        self.device = device or pick_device()
        self._current: LoadedModel | None = None
        self._load_lock = threading.Lock()
        # One `generate` call at a time per process (a batch counts as one): seeds are reproducible
        # and CPU threads are not oversubscribed. Concurrent requests queue here, or in the batcher.
        self._generate_lock = threading.Lock()
        self._startup_error: str | None = None
        self._last_startup_attempt: float | None = None
        self._retry_lock = threading.Lock()  # held while a background retry of the start-up load runs
        self.admission = AdmissionControl(settings)
        self.telemetry = ColdStartTelemetry(startup_phases)
        self.cache = ResponseCache(settings.response_cache_size)
        # Server mode: groups concurrent requests into one `generate` call. None on Lambda (one request
        # per execution environment) and with BATCH_MAX_SIZE=1.
        self.batcher: MicroBatcher[GroupResult] | None = None
        if settings.torch_compile and settings.on_lambda:
            logger.warning("TORCH_COMPILE is ignored on Lambda (README, SnapStart: it does not pay there)")
        if settings.batch_max_size > 1 and not settings.on_lambda:
            self.batcher = MicroBatcher(
                self._run_group, max_size=settings.batch_max_size, window_s=settings.batch_window_ms / 1000
            )

    @property
    def compiled(self) -> bool:
        """TORCH_COMPILE, in server mode only. On demand on Lambda the compile would land on the cold path;
        under SnapStart the INIT's compile does not cover the lengths users ask for: each new one
        recompiled on a user's request (38 s, measured), and a static cache sized for all of them decoded
        no faster than eager (0.95x). See README, SnapStart."""
        return self.settings.torch_compile and not self.settings.on_lambda

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def loading(self) -> bool:
        return self._load_lock.locked() or self._retry_lock.locked()

    @property
    def generating(self) -> bool:
        return self._generate_lock.locked()

    def status(self) -> EngineStatus:
        loaded = self._current
        if loaded is not None:
            return EngineStatus("healthy", loaded.name, loaded.device, None)
        if self.loading:
            return EngineStatus("loading", None, self.device, "the model is loading")
        return EngineStatus("unhealthy", None, self.device, self._not_loaded_reason())

    def cold_start(self) -> dict[str, Any] | None:
        """The start-up phases of this process, or None when no start-up model was loaded."""
        return self.telemetry.phases()

    # Admission.

    @property
    def admitted(self) -> int:
        """Generation requests admitted now: running, or waiting for their turn."""
        return self.admission.admitted

    def admit(self) -> Admission:
        """A place for one generation request, for as long as it runs or waits (streamed: to its last
        chunk); see `function.engine.admission`."""
        return self.admission.admit()

    def load(
        self,
        model_path: str,
        quantization: Quantization = "none",
        *,
        base_model_path: str | None = None,
        adapters: dict[str, str] | None = None,
        check_path: Callable[[str], None] | None = None,
    ) -> tuple[LoadedModel, LoadedModel | None]:
        """Load beside the current model, then swap. Returns (new, previous). 409-style error if busy.

        `model_path` may be a PEFT adapter (its base: `base_model_path`, else the adapter's own
        config); `adapters` are served beside the base, chosen per request."""
        if not self._load_lock.acquire(blocking=False):
            raise ModelLoadInProgressError("a model load is already running; retry when it has finished")
        try:
            new = in_own_thread(
                load_with_decoder,
                model_path,
                quantization,
                self.settings,
                self.device,
                compiled=self.compiled,
                batching=self.batcher is not None,
                base_model_path=base_model_path,
                adapters=adapters,
                check_path=check_path,
            )
            previous, self._current = self._current, new
            self.cache.clear()  # answers of the old model must not outlive it
            self._startup_error = None
        finally:
            self._load_lock.release()
        logger.info(
            "model loaded: %s (%s, %s, %.2fs)", new.name, new.dtype, new.quantization, new.load_seconds
        )
        return new, previous

    @property
    def allowed_model_paths(self) -> list[str]:
        return self.settings.allowed_model_paths or default_allowed_paths(self.settings.model_path)

    def load_requested(
        self, model_path: str, quantization: Quantization = "none", base_model_path: str | None = None
    ) -> tuple[LoadedModel, LoadedModel | None]:
        """A load asked for at run time (/load_model): policy and allow-list first, before any I/O on
        each path (an adapter's base included). ADAPTERS belong to the start-up model only."""
        if self.settings.on_lambda and not self.settings.allow_runtime_model_load:
            raise ForbiddenError(
                "runtime model loading is disabled on Lambda: it would change one execution environment "
                "only. Redeploy with the new model URI (the ModelPrefix parameter), or set "
                "ALLOW_RUNTIME_MODEL_LOAD=true"
            )
        allowed = self.allowed_model_paths
        check_model_path(model_path, allowed)
        return self.load(
            model_path,
            quantization,
            base_model_path=base_model_path,
            check_path=lambda path: check_model_path(path, allowed),
        )

    def require_model(self, params: SamplingParams | None = None) -> LoadedModel:
        """The served model; with `params`, also checks that the adapter they name is loaded."""
        self.ensure_loaded()
        loaded = self._current
        if loaded is None:
            raise ModelNotLoadedError(self._not_loaded_reason())
        if params is not None and params.adapter is not None and params.adapter not in loaded.adapters:
            known = ", ".join(loaded.adapters) or "none: the base model only"
            raise UnknownAdapterError(
                f"unknown adapter {params.adapter!r}; loaded adapters: {known}", field="adapter"
            )
        return loaded

    def adapter_named(self, model: str | None) -> str | None:
        """OpenAI's `model` field: an adapter's name selects it; the base's name, or any other, the base."""
        loaded = self._current
        return model if loaded is not None and model in loaded.adapters else None

    # The request paths. Each takes an optional Cancellation: set, the request stops at its next token
    # (or never starts) and raises ClientClosedRequestError.

    def _model_for(self, params: SamplingParams) -> LoadedModel:
        """The served model for a request, after the checks that need its tokenizer."""
        loaded = self.require_model(params)
        validate_stop_tokens(loaded, params.stop, self.settings)
        return loaded

    def generate(self, prompt: str, params: SamplingParams, cancel: Cancellation | None = None) -> Completion:
        validate_limits(params, self.settings)
        return self._complete(self._model_for(params), prompt, params, add_special_tokens=True, cancel=cancel)

    def chat(
        self, instruction: str, input_text: str, params: SamplingParams, cancel: Cancellation | None = None
    ) -> Completion:
        validate_limits(params, self.settings)
        loaded = self._model_for(params)
        prompt = build_chat_prompt(loaded, instruction, input_text, self.settings)
        # A chat template writes its own special tokens (BOS); don't add them twice.
        return self._complete(
            loaded, prompt, params, add_special_tokens=not loaded.chat_template, cancel=cancel
        )

    def chat_messages(
        self, messages: list[dict[str, str]], params: SamplingParams, cancel: Cancellation | None = None
    ) -> Completion:
        validate_messages(messages, self.settings)
        validate_limits(params, self.settings)
        loaded = self._model_for(params)
        prompt = build_messages_prompt(loaded, messages, self.settings)
        return self._complete(
            loaded, prompt, params, add_special_tokens=not loaded.chat_template, cancel=cancel
        )

    def stream(
        self,
        prompt: str | list[dict[str, str]],
        params: SamplingParams,
        cancel: Cancellation | None = None,
    ) -> TextStream:
        """Text deltas as they are generated, then a StreamEnd. `prompt` is text or OpenAI-style messages.

        Text that could begin a stop string is held back; the deltas always add up to the same text a
        non-streamed request returns. Checks run here, before the first delta: a bad request fails
        before a response starts. Closing the stream (or `cancel`) stops its generation at the next
        token; a cancelled stream just ends, without a StreamEnd.
        """
        if isinstance(prompt, list):
            validate_messages(prompt, self.settings)
        validate_limits(params, self.settings)
        if params.num_return_sequences != 1:
            raise InvalidRequestError("streaming returns one sequence: n must be 1", field="n", limit=1)
        loaded = self._model_for(params)
        if isinstance(prompt, list):
            text, special = build_messages_prompt(loaded, prompt, self.settings), not loaded.chat_template
        else:
            text, special = prompt, True
        encoded, prompt_tokens = encode_prompt(
            loaded, text, params, self.settings, add_special_tokens=special
        )
        events = generate_streamed(
            loaded,
            encoded,
            prompt_tokens,
            within_deadline(params),
            Cancellation(cancel),
            generate_lock=self._generate_lock,
            compiled=self.compiled,
        )
        return TextStream(events, loaded.name)

    def _complete(
        self,
        loaded: LoadedModel,
        prompt: str,
        params: SamplingParams,
        *,
        add_special_tokens: bool,
        cancel: Cancellation | None = None,
    ) -> Completion:
        if cancel is not None and cancel.cancelled:
            raise client_closed()
        cache_key = self.cache.key(loaded, prompt, params, add_special_tokens)
        if cache_key is not None and (cached := self.cache.get(cache_key)) is not None:
            return replace(cached, generation_time=0.0, batch_size=0)  # answered without a generate call
        encoded, prompt_tokens = encode_prompt(
            loaded, prompt, params, self.settings, add_special_tokens=add_special_tokens
        )
        params = within_deadline(params)
        if self.batcher is None:
            result = self._run_group(loaded, [(encoded, params)], [cancel])[0]
        else:
            key = batch_key(loaded, params, reduced_precision=self.settings.batch_reduced_precision)
            result = self.batcher.submit(loaded, encoded, params, key, cancel)
        if cancel is not None and cancel.cancelled:
            raise client_closed()  # its answer stopped short, and nobody waits for it: never cached
        completion = Completion(
            prompt=prompt,
            continuations=result.row.continuations,
            finish_reasons=result.row.finish_reasons,
            prompt_tokens=prompt_tokens,
            completion_tokens=result.row.completion_tokens,
            generation_time=round(result.seconds, 4),
            model_name=loaded.name,
            batch_size=result.batch_size,
        )
        if cache_key is not None:
            self.cache.put(cache_key, completion)
        return completion

    def _run_group(
        self,
        loaded: LoadedModel,
        items: list[tuple[Any, SamplingParams]],
        cancels: list[Cancellation | None] | None = None,
    ) -> list[GroupResult]:
        """`generate` calls for prompts that share their sampling parameters (see batching.batch_key):
        one call, or more where padding to the longest prompt and decoding to the largest
        max_new_tokens would pass the model's context. A prompt cancelled by the time the lock is
        ours is left out (NOT_RUN); one cancelled during its call stops at its next token."""
        from function.engine.generation import run_batch

        row_cancels = cancels if cancels is not None else [None] * len(items)
        out: list[GroupResult] = [NOT_RUN] * len(items)
        with self._generate_lock:
            live = [i for i, cancel in enumerate(row_cancels) if cancel is None or not cancel.cancelled]
            done = 0
            for call in fit_context([items[i] for i in live], loaded.context_length):
                indices, done = live[done : done + len(call)], done + len(call)
                started = time.perf_counter()
                on_first_token = self.telemetry.first_token_recorder(started)
                rows = on_generation_thread(
                    run_batch,
                    loaded,
                    call,
                    on_first_token,
                    compiled=self.compiled,
                    cancels=[row_cancels[i] for i in indices],
                )
                elapsed = time.perf_counter() - started
                for index, row in zip(indices, rows, strict=True):
                    out[index] = GroupResult(row, elapsed, len(call))
        return out


_engine: Engine | None = None
_engine_lock = threading.Lock()


def get_engine(settings: Settings, startup_phases: dict[str, Any] | None = None) -> Engine:
    """The process-wide engine, built once; its start-up model loads on first build.

    Called from the app factory and the Lambda entry, never from an ASGI lifespan hook (Mangum
    would run that on every invocation). `startup_phases` carries what the entry point measured:
    `began` (perf_counter at its start), `imports_s`, `rss_after_imports_mb`. A second call with
    other settings is a programming error: it raises instead of silently serving the first ones.
    """
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = Engine(settings, startup_phases=startup_phases)
            _engine.load_startup_model()
        elif _engine.settings != settings:
            raise RuntimeError(
                "get_engine() was already called with other settings: build an Engine(settings) of its own"
            )
        return _engine


def reset_engine() -> None:
    """Forget the process-wide engine (tests that exercise get_engine itself)."""
    global _engine
    with _engine_lock:
        _engine = None
