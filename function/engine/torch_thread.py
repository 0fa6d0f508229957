"""Where torch's heavy work runs: every generation on one long-lived thread, every model load on a
thread of its own that ends with the load.

PyTorch's CPU wheels parallelize with GNU OpenMP (libgomp), which gives every thread that starts a
parallel region a team of worker threads, kept until that thread ends. Once the process holds more
such workers than it has CPUs, libgomp stops spinning between parallel regions (its "throttled" spin
count) and every region pays a sleep and a wake-up. A decode step is hundreds of small regions:
measured on SmolLM2-135M, 2 cores, a step took 12 ms on a thread alone and 22-25 ms on a second
thread while the thread that had loaded the model (the main thread) kept its team; that is how every
request ran before (request threads, the micro-batcher's thread, a thread per stream), on Lambda too.

So: generation calls `on_generation_thread` (one team, forever); loads call `in_own_thread` (their
team goes with the thread); the main thread and request threads start no parallel region.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_thread_ident: int | None = None


def _remember_thread() -> None:
    global _thread_ident
    _thread_ident = threading.get_ident()


def on_generation_thread(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`function(*args, **kwargs)` on the process's generation thread; waits for it, raises what it raised."""
    global _executor
    if threading.get_ident() == _thread_ident:
        return function(*args, **kwargs)  # already there (a generation that calls back in)
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(1, thread_name_prefix="generation", initializer=_remember_thread)
        executor = _executor
    return executor.submit(function, *args, **kwargs).result()


def in_own_thread(function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
    """`function(*args, **kwargs)` on a new thread that ends when it returns; waits for it."""
    with ThreadPoolExecutor(1, thread_name_prefix="load") as executor:
        return executor.submit(function, *args, **kwargs).result()


def _forget_after_fork() -> None:
    """A forked child (the SnapStart emulation's restores) has none of its parent's threads."""
    global _executor, _thread_ident, _lock
    _executor, _thread_ident, _lock = None, None, threading.Lock()


os.register_at_fork(after_in_child=_forget_after_fork)
