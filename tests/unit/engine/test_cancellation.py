"""Cancelled requests stop at their next token: in process, from another thread, before their turn,
and streamed."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from function.engine.engine import Engine
from function.engine.types import Cancellation, SamplingParams, StreamEnd
from function.errors import (
    ClientClosedRequestError,
)
from tests.support.cancellation import CancelAfter
from tests.support.settings import make_settings
from tests.support.waiting import wait_until

SAMPLED = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, seed=0)


LONG = SamplingParams(max_new_tokens=2000, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def slow_engine(slow_model_dir: Path) -> Iterator[Engine]:
    """A model slow enough that 2000 tokens take minutes: a generation that was not stopped shows."""
    engine = Engine(make_settings(model_path=str(slow_model_dir), max_new_tokens=2000))
    engine.load_startup_model()
    yield engine
    assert wait_until(lambda: not engine.generating, 30)  # nothing left running for the next module


def test_a_request_cancelled_during_its_generation_stops_within_a_token(served_engine: Engine) -> None:
    # GIVEN a request that runs all 24 tokens when nobody cancels it
    assert served_engine.generate("Python", SAMPLED).completion_tokens == 24
    cancel = CancelAfter(4)  # looked at three times before generating (request, batch, lock), then per token

    # WHEN it is cancelled after its first token
    with pytest.raises(ClientClosedRequestError) as caught:
        served_engine.generate("Python", SAMPLED, cancel)

    # THEN it stopped at that look (and one more, the engine's last check) and said so: 499, nobody to answer
    assert cancel.looks_left == -2
    assert caught.value.status == 499


def test_a_cancellation_from_another_thread_stops_a_long_generation(slow_engine: Engine) -> None:
    cancel = Cancellation()
    with ThreadPoolExecutor(max_workers=1) as pool:
        running = pool.submit(slow_engine.generate, "Python", LONG, cancel)
        assert wait_until(lambda: slow_engine.generating, 30)

        cancel.cancel()  # what the route does when the client hangs up

        with pytest.raises(ClientClosedRequestError):
            running.result(timeout=20)  # 2000 tokens would take minutes
    assert not slow_engine.generating


def test_a_request_cancelled_before_its_turn_never_generates(served_engine: Engine) -> None:
    cancel = Cancellation()
    cancel.cancel()

    with pytest.raises(ClientClosedRequestError):
        served_engine.generate("Python", SAMPLED, cancel)
    assert list(served_engine.stream("Python", SAMPLED, cancel)) == []  # a stream just ends


def test_closing_a_stream_stops_its_generation(slow_engine: Engine) -> None:
    # GIVEN a stream that has started generating 2000 tokens
    stream = slow_engine.stream("Python", LONG)
    assert isinstance(next(stream), str)
    assert slow_engine.generating

    # WHEN its reader gives it up
    stream.close()

    # THEN its generation stops (at the next token), and the engine is free
    assert wait_until(lambda: not slow_engine.generating, 20)


def test_a_cancelled_stream_ends_without_a_stream_end(slow_engine: Engine) -> None:
    cancel = Cancellation()
    stream = slow_engine.stream("Python", LONG, cancel)
    assert isinstance(next(stream), str)

    cancel.cancel()
    rest = list(stream)  # ends at the next token, not after 2000

    assert not any(isinstance(item, StreamEnd) for item in rest)
    assert not slow_engine.generating
