"""The generation deadline of the current request.

Set by whoever knows it (the Lambda handler, from the invocation's remaining time and API
Gateway's limit). Generation stops itself before it, with finish_reason "time", instead of
being killed.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import replace

from function.engine.types import SamplingParams

MIN_GENERATION_SECONDS = 0.05

# A monotonic deadline, or None: no deadline.
generation_deadline: ContextVar[float | None] = ContextVar("generation_deadline", default=None)


@contextmanager
def deadline_in(seconds: float | None) -> Iterator[None]:
    """Run the block with a generation deadline `seconds` from now (None: no deadline)."""
    token = generation_deadline.set(None if seconds is None else time.monotonic() + seconds)
    try:
        yield
    finally:
        generation_deadline.reset(token)


def within_deadline(params: SamplingParams) -> SamplingParams:
    """`params` with a time budget that ends before the current deadline (at least MIN_GENERATION_SECONDS)."""
    deadline = generation_deadline.get()
    if deadline is None:
        return params
    left = max(MIN_GENERATION_SECONDS, deadline - time.monotonic())
    budget = left if params.max_time is None else min(params.max_time, left)
    return replace(params, max_time=budget)
