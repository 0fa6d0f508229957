"""A streamed generation: the worker thread, the stop-string hold-back and the end of the stream."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator
from typing import TYPE_CHECKING, Any

from function.engine.streaming import StopHoldBack
from function.engine.types import Cancellation, SamplingParams, StreamEnd

if TYPE_CHECKING:
    from function.weights.loading import LoadedModel


def generate_streamed(
    loaded: LoadedModel,
    encoded: Any,
    prompt_tokens: int,
    params: SamplingParams,
    cancel: Cancellation,
    *,
    generate_lock: threading.Lock,
    compiled: bool,
) -> Generator[str | StreamEnd, None, None]:
    """One streamed generation: `generate` in a worker thread (under the process's generate lock),
    its text deltas held back at possible stop strings, then a StreamEnd. Closing the generator
    early, or `cancel`, stops the generation at its next token."""
    from transformers import TextIteratorStreamer

    from function.engine.generation import run_generation
    from function.engine.torch_thread import on_generation_thread

    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            with generate_lock:
                if cancel.cancelled:  # given up while it waited for its turn: never starts
                    streamer.end()
                    return
                started = time.perf_counter()
                outcome["result"] = on_generation_thread(
                    run_generation,
                    loaded,
                    encoded,
                    params,
                    streamer=streamer,
                    compiled=compiled,
                    cancel=cancel,
                )
                outcome["seconds"] = time.perf_counter() - started
        except BaseException as exc:  # surfaced to the reader below
            outcome["error"] = exc
            streamer.end()

    worker = threading.Thread(target=work, name="generate-stream", daemon=True)
    worker.start()
    finished = False
    try:
        hold_back = StopHoldBack(params.stop)
        for delta in streamer:
            if cancel.cancelled:
                break
            if safe := hold_back.feed(delta):
                yield safe
        worker.join()
        if cancel.cancelled:
            return
        if "error" in outcome:
            raise outcome["error"]
        row = outcome["result"]
        if rest := hold_back.finish(row.continuations[0]):
            yield rest
        finished = True
        yield StreamEnd(
            row.finish_reasons[0],
            prompt_tokens,
            row.completion_tokens,
            loaded.name,
            round(outcome["seconds"], 4),
        )
    finally:
        if not finished:  # closed early (the reader is gone), or failed: stop generating
            cancel.cancel()
