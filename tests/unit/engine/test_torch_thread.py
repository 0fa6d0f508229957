"""Where torch's work runs (function.engine.torch_thread): every generation on one long-lived thread,
whichever thread asks, every load on a thread that ends with it; and a forked child starts afresh."""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from function.engine.engine import Engine
from function.engine.torch_thread import in_own_thread, on_generation_thread
from function.engine.types import Cancellation, SamplingParams
from tests.support.settings import make_settings


class WhereLooked(Cancellation):
    """Never cancelled; remembers the threads generation looked from (it looks once per token)."""

    def __init__(self) -> None:
        super().__init__()
        self.threads: set[str] = set()

    @property
    def cancelled(self) -> bool:
        self.threads.add(threading.current_thread().name)
        return False


def test_every_call_runs_on_one_thread_whoever_calls() -> None:
    with ThreadPoolExecutor(4) as callers:
        idents = set(callers.map(lambda _: on_generation_thread(threading.get_ident), range(16)))

    assert len(idents) == 1 and threading.get_ident() not in idents
    assert on_generation_thread(threading.get_ident) == idents.pop()  # the same thread later


def test_a_call_raises_what_its_function_raised() -> None:
    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        on_generation_thread(fail)
    assert on_generation_thread(lambda: 7) == 7  # and the thread lives on


def test_a_call_from_the_generation_thread_runs_in_place() -> None:
    assert on_generation_thread(lambda: on_generation_thread(threading.get_ident)) == on_generation_thread(
        threading.get_ident
    )


def test_in_own_thread_runs_elsewhere_and_the_thread_ends() -> None:
    thread = in_own_thread(threading.current_thread)

    assert thread is not threading.current_thread()
    assert not thread.is_alive()


def test_a_forked_child_gets_a_generation_thread_of_its_own() -> None:
    on_generation_thread(lambda: None)  # the parent's thread exists
    pid = os.fork()
    if pid == 0:  # the child: the parent's thread is not here; a call must not wait for it forever
        signal.alarm(20)
        os._exit(0 if on_generation_thread(lambda: 42) == 42 else 1)
    _, status = os.waitpid(pid, 0)

    assert os.waitstatus_to_exitcode(status) == 0


def test_the_engine_generates_on_the_generation_thread(demo_model_dir: Path) -> None:
    engine = Engine(make_settings(batch_max_size=1))
    engine.load(str(demo_model_dir))
    looked = WhereLooked()

    engine.generate("Hello", SamplingParams(max_new_tokens=4, temperature=0), cancel=looked)
    streamed = WhereLooked()
    list(engine.stream("Hello", SamplingParams(max_new_tokens=4, temperature=0), cancel=streamed))

    generation_thread = on_generation_thread(lambda: threading.current_thread().name)
    assert looked.threads >= {generation_thread} and streamed.threads >= {generation_thread}
    assert not any(thread.name.startswith("load") for thread in threading.enumerate())
