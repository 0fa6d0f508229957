"""Micro-batching for server mode: concurrent requests that can share a `generate` call get one.

Callers block in `submit` while one worker thread collects requests (each arrival keeps the batch
open one more window, up to MAX_WINDOWS windows from the first) until a batch is full, groups
them by `batch_key`, and runs each group through the engine's runner. A request that can't
share (a seeded sample, a time budget, a greedy request on a model whose rounding depends on the
batch) runs alone, in arrival order with the rest. A batch that fails is retried one request at
a time, so one request's failure (or a batch too big for memory) is never another's. A request
cancelled (its client hung up) before its batch runs is left out of it; one cancelled while its
batch runs stops at its next token, and the others go on.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

from function.engine.types import Cancellation, SamplingParams
from function.errors import ClientClosedRequestError

if TYPE_CHECKING:
    from function.weights.loading import LoadedModel

logger = logging.getLogger(__name__)

Result = TypeVar("Result")
MAX_WINDOWS = 4  # a batch waits at most this many windows from its first request
# Runs one group on one model: the encoded prompts with their parameters and cancellations, one result each.
Runner = Callable[["LoadedModel", list[tuple[Any, SamplingParams]], list[Cancellation | None]], list[Result]]


def exact_batching(loaded: LoadedModel) -> bool:
    """Whether batching leaves greedy answers unchanged on this model: our decoder's batched rows decode
    bitwise as alone (`batch_exact`: by construction on our own matmuls, else measured at load by
    function.engine.calibration), or float32 on the CPU, unquantized.

    float32 (tests/unit/engine/test_batching.py, `make bench` on the 100M model): a row's rounding
    does depend on the batch (its matmuls differ from a one-row call in the last bits), but far
    below what flips a greedy choice. In bf16, quantized and on CUDA, transformers' padded batches
    changed greedy answers (2 of 8 on the 100M model in bf16): those run alone unless our decoder
    measured its rows bitwise exact.
    """
    decoder = loaded.decoder
    return float32_batching(loaded) or (decoder is not None and bool(decoder.batch_exact))


def float32_batching(loaded: LoadedModel) -> bool:
    """float32 on the CPU, unquantized: batched greedy answers kept (see `exact_batching`)."""
    return loaded.device == "cpu" and loaded.dtype == "float32" and loaded.quantization == "none"


def batch_key(loaded: LoadedModel, params: SamplingParams, *, reduced_precision: bool) -> Hashable | None:
    """Requests with equal keys can share a `generate` call; None runs alone."""
    if params.max_time is not None:
        return None  # a time budget is per request
    if params.greedy:
        if not (reduced_precision or exact_batching(loaded)):
            return None
        # Greedy rows ignore temperature, top_p, top_k and the seed; n is a copy of one row.
        return id(loaded), params.adapter, "greedy", params.repetition_penalty, params.stop
    if params.seed is not None:
        return None  # a seed's random stream belongs to its request alone
    return (
        id(loaded),
        params.adapter,
        "sample",
        params.temperature,
        params.top_p,
        params.top_k,
        params.repetition_penalty,
        params.stop,
        params.num_return_sequences,
    )


def fit_context(
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


@dataclass
class _Job(Generic[Result]):
    key: Hashable | None
    loaded: LoadedModel
    encoded: Any
    params: SamplingParams
    cancel: Cancellation | None = None
    arrived: float = field(default_factory=time.monotonic)
    future: Future[Result] = field(default_factory=Future)


class BatcherClosedError(RuntimeError):
    """The batcher was closed: it takes no more requests."""


class MicroBatcher(Generic[Result]):
    """One worker thread; `submit` blocks until the runner's result for this request is in."""

    def __init__(self, runner: Runner[Result], *, max_size: int, window_s: float) -> None:
        self.runner = runner
        self.max_size = max_size
        self.window_s = window_s
        self.batch_sizes: Counter[int] = Counter()  # how many groups ran with each size
        self._queue: queue.Queue[_Job[Result] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    def submit(
        self,
        loaded: LoadedModel,
        encoded: Any,
        params: SamplingParams,
        key: Hashable | None,
        cancel: Cancellation | None = None,
    ) -> Result:
        """The runner's result for this request. A request cancelled before its batch runs is left out of
        it (ClientClosedRequestError); one cancelled while it runs stops at its next token."""
        job: _Job[Result] = _Job(key, loaded, encoded, params, cancel)
        with self._lock:  # queued under the lock: close() can't slip in between and strand the job
            if self._closed:
                raise BatcherClosedError("the batcher is closed")
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name="micro-batcher", daemon=True)
                self._worker.start()
            self._queue.put(job)
        return job.future.result()

    def close(self) -> None:
        """Take no more requests; stop the worker once the requests already queued have run."""
        with self._lock:
            self._closed = True
            worker = self._worker
            if worker is not None:
                self._queue.put(None)
        if worker is not None:
            worker.join()

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            try:
                jobs, stop = self._collect(first)
                for group in self._groups(jobs):
                    self._run(group)
            except BaseException as exc:  # a bug here must fail its requests, never strand them
                logger.exception("the micro-batcher failed")
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def _collect(self, first: _Job[Result]) -> tuple[list[_Job[Result]], bool]:
        """The first job and those that follow it, each within a window of the one before (clients of a
        burst arrive staggered), for at most MAX_WINDOWS windows in all, until its group is full."""
        jobs = [first]
        if first.key is None:
            return jobs, False  # it runs alone: no reason to wait
        close_at = first.arrived + self.window_s
        last_call = first.arrived + MAX_WINDOWS * self.window_s
        while sum(job.key == first.key for job in jobs) < self.max_size:
            left = min(close_at, last_call) - time.monotonic()
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            jobs.append(job)
            close_at = max(close_at, job.arrived + self.window_s)
        return jobs, False

    def _groups(self, jobs: list[_Job[Result]]) -> list[list[_Job[Result]]]:
        """Jobs by key (one without a key alone), in order of first arrival, cut to the size cap."""
        by_key: dict[Hashable, list[_Job[Result]]] = {}
        for job in jobs:
            by_key.setdefault(job.key if job.key is not None else object(), []).append(job)
        groups: list[list[_Job[Result]]] = []
        for same in by_key.values():
            groups.extend(same[i : i + self.max_size] for i in range(0, len(same), self.max_size))
        return groups

    def _run(self, group: list[_Job[Result]]) -> None:
        for job in group:
            if job.cancel is not None and job.cancel.cancelled:
                job.future.set_exception(ClientClosedRequestError("the client closed the request"))
        group = [job for job in group if not job.future.done()]
        if not group:
            return
        try:
            results = self.runner(
                group[0].loaded, [(job.encoded, job.params) for job in group], [job.cancel for job in group]
            )
            if len(results) != len(group):
                raise RuntimeError(f"the runner returned {len(results)} results for {len(group)} requests")
        except BaseException as exc:  # handed to the callers; the worker lives on
            if len(group) > 1:
                logger.warning("a batch of %d failed (%s); running its requests one by one", len(group), exc)
                for job in group:
                    self._run([job])
                return
            group[0].future.set_exception(exc)
            return
        self.batch_sizes[len(group)] += 1
        for job, result in zip(group, results, strict=True):
            job.future.set_result(result)
