"""The one owner of the model: load, swap, generate, chat. Knows nothing of HTTP.

The served model is one immutable `LoadedModel` behind a reference that is replaced whole,
under a lock, only after a new model has loaded completely. A request takes the reference
once and uses it to the end, so requests in flight finish on the model they started with and
a failed load leaves the old model serving.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from function.allowlist import check_model_path, default_allowed_paths
from function.batching import MicroBatcher, batch_key
from function.config import Settings
from function.errors import (
    ContextLengthExceededError,
    ForbiddenError,
    InvalidRequestError,
    ModelLoadError,
    ModelLoadInProgressError,
    ModelNotLoadedError,
    PayloadTooLargeError,
)
from function.loading import LoadedModel, Quantization, load_model, pick_device, quantization_from_flags
from function.response_cache import ResponseCache

logger = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "time"]
# Continuations (stop strings cut off), their finish reasons, and the tokens produced.
GenerationResult = tuple[list[str], list[FinishReason], int]
MIN_GENERATION_SECONDS = 0.05
# Below this, sampling is argmax in all but name, and dividing logits by it overflows: decode greedily.
GREEDY_TEMPERATURE = 1e-5

# A monotonic deadline for the generation of the current request, set by whoever knows it (the
# Lambda handler, from the invocation's remaining time and API Gateway's limit). Generation stops
# itself before it, with finish_reason "time", instead of being killed.
generation_deadline: ContextVar[float | None] = ContextVar("generation_deadline", default=None)


@contextmanager
def deadline_in(seconds: float | None) -> Iterator[None]:
    """Run the block with a generation deadline `seconds` from now (None: no deadline)."""
    token = generation_deadline.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        generation_deadline.reset(token)


@dataclass(frozen=True)
class SamplingParams:
    """What one generation does. `temperature == 0` or `do_sample=False` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    do_sample: bool = True
    num_return_sequences: int = 1
    stop: tuple[str, ...] = ()
    seed: int | None = None
    max_time: float | None = None

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class Completion:
    """Continuations (prompt excluded) with their finish reasons and token counts."""

    prompt: str
    continuations: list[str]
    finish_reasons: list[FinishReason]
    prompt_tokens: int
    completion_tokens: int
    generation_time: float
    model_name: str
    batch_size: int = 1  # requests that shared this one's `generate` call (micro-batching); 0: from the cache


@dataclass(frozen=True)
class EngineStatus:
    state: Literal["healthy", "loading", "unhealthy"]
    model_name: str | None
    device: str
    reason: str | None


def validate_limits(params: SamplingParams, settings: Settings) -> None:
    """Bounds that depend on the server's settings, and combinations the schema can't see."""
    if params.max_new_tokens > settings.max_new_tokens:
        raise InvalidRequestError(
            f"max_new_tokens must be at most {settings.max_new_tokens}",
            field="max_new_tokens",
            limit=settings.max_new_tokens,
        )
    if params.num_return_sequences > settings.max_num_return_sequences:
        raise InvalidRequestError(
            f"num_return_sequences must be at most {settings.max_num_return_sequences}",
            field="num_return_sequences",
            limit=settings.max_num_return_sequences,
        )


def build_chat_prompt(loaded: LoadedModel, instruction: str, input_text: str, settings: Settings) -> str:
    """The tokenizer's chat template when the model has one, else the instruction format."""
    if loaded.chat_template:
        content = instruction if not input_text else f"{instruction}\n\n{input_text}"
        prompt: str = loaded.tokenizer.apply_chat_template(
            [{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True
        )
        return prompt
    if input_text:
        return settings.instruction_input_template.format(instruction=instruction, input=input_text)
    return settings.instruction_template.format(instruction=instruction)


def build_messages_prompt(loaded: LoadedModel, messages: list[dict[str, str]], settings: Settings) -> str:
    """OpenAI-style messages: the chat template, else the instruction format with the last user message
    (or the last message, when none is the user's) as the instruction and the turns before it as the input."""
    if loaded.chat_template:
        prompt: str = loaded.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        return prompt
    users = [index for index, message in enumerate(messages) if message["role"] == "user"]
    last_user = users[-1] if users else len(messages) - 1  # no user turn: the last message is the instruction
    context = "\n".join(f"{m['role']}: {m['content']}" for m in messages[:last_user])
    return build_chat_prompt(loaded, messages[last_user]["content"], context, settings)


@dataclass(frozen=True)
class StreamEnd:
    """The last item of a stream: how it finished, and the token counts."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model_name: str


@dataclass
class ModelManager:
    """Holds the served model; `load` swaps it atomically, `generate`/`chat` use a snapshot."""

    settings: Settings
    device: str = field(default_factory=pick_device)
    _current: LoadedModel | None = field(default=None, init=False)
    _load_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    # One `generate` call at a time per process (a batch counts as one): seeds are reproducible
    # and CPU threads are not oversubscribed. Concurrent requests queue here, or in the batcher.
    _generate_lock: threading.Lock = field(default_factory=threading.Lock, init=False)
    _startup_error: str | None = field(default=None, init=False)
    _last_startup_attempt: float | None = field(default=None, init=False)
    # Cold-start phases of this process: imports (measured by the entry point), fetch and load of
    # the start-up model, and the first token of the first generation.
    startup_phases: dict[str, Any] = field(default_factory=dict)
    cache: ResponseCache = field(init=False)
    # Server mode: groups concurrent requests into one `generate` call. None on Lambda (one request
    # per execution environment) and with BATCH_MAX_SIZE=1.
    batcher: MicroBatcher[tuple[GenerationResult, float, int]] | None = field(default=None, init=False)
    _cold_start: dict[str, Any] | None = field(default=None, init=False)
    _first_token_pending: bool = field(default=True, init=False)

    def __post_init__(self) -> None:
        self.cache = ResponseCache(self.settings.response_cache_size)
        if self.settings.torch_compile and self.settings.on_lambda:
            logger.warning("TORCH_COMPILE is ignored on Lambda: compiling would land on the cold path")
        if self.settings.batch_max_size > 1 and not self.settings.on_lambda:
            self.batcher = MicroBatcher(
                self._run_group,
                max_size=self.settings.batch_max_size,
                window_s=self.settings.batch_window_ms / 1000,
            )

    @property
    def compiled(self) -> bool:
        """TORCH_COMPILE, in server mode only: on Lambda the compile would land on the cold path."""
        return self.settings.torch_compile and not self.settings.on_lambda

    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def loading(self) -> bool:
        return self._load_lock.locked()

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

    def _not_loaded_reason(self) -> str:
        if self._startup_error is not None:
            return f"the start-up model failed to load: {self._startup_error}"
        if self.settings.model_path is None:
            return "no model configured: set MODEL_PATH or call /load_model"
        return "the model has not been loaded yet"

    def load_startup_model(self) -> None:
        """Load MODEL_PATH if set; a failure is recorded for /health, never raised."""
        if self.settings.model_path is None or self._current is not None:
            return
        self._last_startup_attempt = time.monotonic()
        quantization = quantization_from_flags(self.settings.load_in_8bit, self.settings.load_in_4bit)
        try:
            loaded, _ = self.load(self.settings.model_path, quantization)
            self._record_cold_start(loaded)
        except ModelLoadInProgressError:
            return
        except ModelLoadError as exc:
            self._startup_error = exc.message
            logger.error("start-up model load failed: %s", exc.message)

    def ensure_loaded(self) -> None:
        """Retry a failed start-up load, at most once per `load_retry_interval_s`."""
        if self._current is not None or self.settings.model_path is None or self.loading:
            return
        last = self._last_startup_attempt
        if last is None or time.monotonic() - last >= self.settings.load_retry_interval_s:
            self.load_startup_model()

    def load(
        self, model_path: str, quantization: Quantization = "none"
    ) -> tuple[LoadedModel, LoadedModel | None]:
        """Load beside the current model, then swap. Returns (new, previous). 409-style error if busy."""
        if not self._load_lock.acquire(blocking=False):
            raise ModelLoadInProgressError("a model load is already running; retry when it has finished")
        try:
            new = load_model(model_path, quantization, self.settings, self.device)
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
        self, model_path: str, quantization: Quantization = "none"
    ) -> tuple[LoadedModel, LoadedModel | None]:
        """A load asked for at run time (/load_model): policy and allow-list first, before any I/O."""
        if self.settings.on_lambda and not self.settings.allow_runtime_model_load:
            raise ForbiddenError(
                "runtime model loading is disabled on Lambda: it would change one execution environment "
                "only. Redeploy with the new model URI (the ModelPrefix parameter), or set "
                "ALLOW_RUNTIME_MODEL_LOAD=true"
            )
        check_model_path(model_path, self.allowed_model_paths)
        return self.load(model_path, quantization)

    def require_model(self) -> LoadedModel:
        self.ensure_loaded()
        loaded = self._current
        if loaded is None:
            raise ModelNotLoadedError(self._not_loaded_reason())
        return loaded

    def generate(self, prompt: str, params: SamplingParams) -> Completion:
        validate_limits(params, self.settings)
        return self._complete(self.require_model(), prompt, params, add_special_tokens=True)

    def chat(self, instruction: str, input_text: str, params: SamplingParams) -> Completion:
        validate_limits(params, self.settings)
        loaded = self.require_model()
        prompt = build_chat_prompt(loaded, instruction, input_text, self.settings)
        # A chat template writes its own special tokens (BOS); don't add them twice.
        return self._complete(loaded, prompt, params, add_special_tokens=not loaded.chat_template)

    def chat_messages(self, messages: list[dict[str, str]], params: SamplingParams) -> Completion:
        validate_limits(params, self.settings)
        loaded = self.require_model()
        prompt = build_messages_prompt(loaded, messages, self.settings)
        return self._complete(loaded, prompt, params, add_special_tokens=not loaded.chat_template)

    def stream(self, prompt: str | list[dict[str, str]], params: SamplingParams) -> Iterator[str | StreamEnd]:
        """Text deltas as they are generated, then a StreamEnd. `prompt` is text or OpenAI-style messages.

        Text that could begin a stop string is held back; the deltas always add up to the same text a
        non-streamed request returns.
        """
        validate_limits(params, self.settings)
        if params.num_return_sequences != 1:
            raise InvalidRequestError("streaming returns one sequence: n must be 1", field="n", limit=1)
        loaded = self.require_model()
        if isinstance(prompt, list):
            text, special = build_messages_prompt(loaded, prompt, self.settings), not loaded.chat_template
        else:
            text, special = prompt, True
        encoded, prompt_tokens = self._encode(loaded, text, params, add_special_tokens=special)
        return self._stream(loaded, encoded, prompt_tokens, self._within_deadline(params))

    def _stream(
        self, loaded: LoadedModel, encoded: Any, prompt_tokens: int, params: SamplingParams
    ) -> Iterator[str | StreamEnd]:
        from transformers import TextIteratorStreamer

        from function.generation import run_generation

        streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                with self._generate_lock:
                    outcome["result"] = run_generation(
                        loaded, encoded, params, None, streamer=streamer, compiled=self.compiled
                    )
            except BaseException as exc:  # surfaced to the reader below
                outcome["error"] = exc
                streamer.end()

        worker = threading.Thread(target=work, name="generate-stream", daemon=True)
        worker.start()
        held_back = max((len(stop) for stop in params.stop), default=1) - 1
        received, sent = "", 0
        for delta in streamer:
            received += delta
            cut = min((i for stop in params.stop if (i := received.find(stop)) >= 0), default=None)
            safe = cut if cut is not None else len(received) - held_back
            if safe > sent:
                yield received[sent:safe]
                sent = safe
        worker.join()
        if "error" in outcome:
            raise outcome["error"]
        continuations, reasons, produced = outcome["result"]
        final = continuations[0]
        if final.startswith(received[:sent]) and len(final) > sent:
            yield final[sent:]
        yield StreamEnd(reasons[0], prompt_tokens, produced, loaded.name)

    def _encode(
        self, loaded: LoadedModel, prompt: str, params: SamplingParams, *, add_special_tokens: bool
    ) -> tuple[Any, int]:
        """Tokenize and check the prompt against the caps and the context."""
        encoded = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
        prompt_tokens = int(encoded["input_ids"].shape[1])
        cap = self.settings.max_prompt_tokens
        if cap is not None and prompt_tokens > cap:
            raise PayloadTooLargeError(
                f"the prompt has {prompt_tokens} tokens; the limit is {cap}", field="prompt", limit=cap
            )
        total = prompt_tokens + params.max_new_tokens
        if total > loaded.context_length:
            raise ContextLengthExceededError(
                f"the prompt has {prompt_tokens} tokens and max_new_tokens is {params.max_new_tokens}: "
                f"{total} exceeds the model's context length of {loaded.context_length}",
                field="max_new_tokens",
                limit=loaded.context_length,
            )
        return encoded, prompt_tokens

    def _complete(
        self, loaded: LoadedModel, prompt: str, params: SamplingParams, *, add_special_tokens: bool
    ) -> Completion:
        cache_key = self.cache.key(loaded, prompt, params, add_special_tokens)
        if cache_key is not None and (cached := self.cache.get(cache_key)) is not None:
            return replace(cached, generation_time=0.0, batch_size=0)  # answered without a generate call
        encoded, prompt_tokens = self._encode(loaded, prompt, params, add_special_tokens=add_special_tokens)
        params = self._within_deadline(params)
        if self.batcher is None:
            (continuations, reasons, produced), elapsed, batch_size = self._run_group(
                loaded, [(encoded, params)]
            )[0]
        else:
            key = batch_key(loaded, params, reduced_precision=self.settings.batch_reduced_precision)
            (continuations, reasons, produced), elapsed, batch_size = self.batcher.submit(
                loaded, encoded, params, key
            )
        completion = Completion(
            prompt=prompt,
            continuations=continuations,
            finish_reasons=reasons,
            prompt_tokens=prompt_tokens,
            completion_tokens=produced,
            generation_time=round(elapsed, 4),
            model_name=loaded.name,
            batch_size=batch_size,
        )
        if cache_key is not None:
            self.cache.put(cache_key, completion)
        return completion

    def _run_group(
        self, loaded: LoadedModel, items: list[tuple[Any, SamplingParams]]
    ) -> list[tuple[GenerationResult, float, int]]:
        """`generate` calls for prompts that share their sampling parameters (see batching.batch_key):
        one call, or more where padding to the longest prompt and decoding to the largest
        max_new_tokens would pass the model's context. Each prompt's result, with its call's
        seconds and size."""
        from function.generation import run_batch

        out: list[tuple[GenerationResult, float, int]] = []
        with self._generate_lock:
            for call in _fit_context(items, loaded.context_length):
                started = time.perf_counter()
                on_first_token = self._first_token_recorder(started) if self._first_token_pending else None
                results = run_batch(loaded, call, on_first_token, compiled=self.compiled)
                elapsed = time.perf_counter() - started
                out += [(result, elapsed, len(call)) for result in results]
        return out

    @staticmethod
    def _within_deadline(params: SamplingParams) -> SamplingParams:
        deadline = generation_deadline.get()
        if deadline is None:
            return params
        left = max(MIN_GENERATION_SECONDS, deadline - time.monotonic())
        budget = left if params.max_time is None else min(params.max_time, left)
        return replace(params, max_time=budget)

    def _record_cold_start(self, loaded: LoadedModel) -> None:
        fetch = loaded.fetch
        began = self.startup_phases.get("began")
        self._cold_start = {
            "imports_s": self.startup_phases.get("imports_s"),
            "rss_after_imports_mb": self.startup_phases.get("rss_after_imports_mb"),
            "ready_s": None if began is None else round(time.perf_counter() - began, 4),
            "fetch_s": round(fetch.seconds if fetch else loaded.resolve_seconds, 4),
            "fetch_bytes": fetch.bytes_downloaded if fetch else 0,
            "fetch_mb_per_s": round(fetch.megabytes_per_second, 1) if fetch else None,
            "fetch_from_cache": fetch.from_cache if fetch else None,
            "load_s": round(loaded.load_seconds, 4),
            "first_token_s": None,
        }

    def _first_token_recorder(self, started: float) -> Any:
        def record() -> None:
            if not self._first_token_pending:
                return
            self._first_token_pending = False
            if self._cold_start is not None:
                self._cold_start["first_token_s"] = round(time.perf_counter() - started, 4)
                logger.info(json.dumps({"event": "cold_start", **self._cold_start}))

        return record

    def cold_start(self) -> dict[str, Any] | None:
        """The start-up phases of this process, or None when no start-up model was loaded."""
        return None if self._cold_start is None else dict(self._cold_start)


def _fit_context(
    items: list[tuple[Any, SamplingParams]], context_length: int
) -> list[list[tuple[Any, SamplingParams]]]:
    """Split a group, in order, so no call pads and decodes past the context (each item fits alone)."""
    calls: list[list[tuple[Any, SamplingParams]]] = []
    width = longest = 0
    for item in items:
        prompt, limit = int(item[0]["input_ids"].shape[1]), item[1].max_new_tokens
        if calls and max(width, prompt) + max(longest, limit) <= context_length:
            calls[-1].append(item)
            width, longest = max(width, prompt), max(longest, limit)
        else:
            calls.append([item])
            width, longest = prompt, limit
    return calls


_engine: ModelManager | None = None
_engine_lock = threading.Lock()


def get_engine(settings: Settings, startup_phases: dict[str, Any] | None = None) -> ModelManager:
    """The process-wide engine, built once; its start-up model loads on first build.

    Called from the app factory and the Lambda handler module, never from an ASGI lifespan
    hook (Mangum would run that on every invocation). `startup_phases` carries what the entry
    point measured: `began` (perf_counter at its start), `imports_s`, `rss_after_imports_mb`.
    """
    global _engine
    with _engine_lock:
        if _engine is None:
            _engine = ModelManager(settings, startup_phases=startup_phases or {})
            _engine.load_startup_model()
        return _engine
