"""The engine's vocabulary: what a request asks for, what it gets back, and the engine's states.

Imports nothing else from the package, so every layer (weights, engine, api, aws) can use it
without an import cycle.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Literal

FinishReason = Literal["stop", "length", "time"]
Quantization = Literal["none", "8bit", "4bit"]
QuantizationBackend = Literal["torchao", "bitsandbytes"]  # torchao on CPU, bitsandbytes on CUDA
HealthState = Literal["healthy", "loading", "unhealthy"]

# Below this, sampling is argmax in all but name, and dividing logits by it overflows: decode greedily.
GREEDY_TEMPERATURE = 1e-5


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
    adapter: str | None = None  # a named LoRA adapter (ADAPTERS); None: the base model

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature < GREEDY_TEMPERATURE


@dataclass(frozen=True)
class RowResult:
    """One prompt's share of a `generate` call: continuations (stop strings cut off), their finish
    reasons, and the tokens produced for all of them."""

    continuations: list[str]
    finish_reasons: list[FinishReason]
    completion_tokens: int


@dataclass(frozen=True)
class GroupResult:
    """A `RowResult` with the call it came from: its seconds and how many requests shared it."""

    row: RowResult
    seconds: float
    batch_size: int


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
class StreamEnd:
    """The last item of a stream: how it finished, and the token counts."""

    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    model_name: str
    generation_time: float = 0.0  # seconds the stream's `generate` call ran


class Cancellation:
    """Set when a request's answer is no longer wanted (its client hung up): its generation stops at the
    next token, and a request not yet started never starts. Thread-safe; setting it twice is harmless.

    With a `parent`, it is also cancelled whenever the parent is (a stream's own token, under its request's).
    """

    def __init__(self, parent: Cancellation | None = None) -> None:
        self._event = threading.Event()
        self._parent = parent

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set() or (self._parent is not None and self._parent.cancelled)


@dataclass(frozen=True)
class EngineStatus:
    state: HealthState
    model_name: str | None
    device: str
    reason: str | None
