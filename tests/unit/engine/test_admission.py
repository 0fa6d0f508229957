"""Admission control: at most MAX_QUEUED_REQUESTS generation requests at once in server mode."""

from __future__ import annotations

import pytest

from function.engine.engine import Engine
from function.errors import (
    OverloadedError,
)
from tests.support.settings import make_settings


def test_admission_is_bounded_and_every_place_comes_back_once() -> None:
    # GIVEN room for two generation requests (no model needed to count)
    engine = Engine(make_settings(max_queued_requests=2))
    first, second = engine.admit(), engine.admit()

    # WHEN a third arrives
    with pytest.raises(OverloadedError) as caught:
        engine.admit()

    # THEN it is refused at once: 503, Retry-After 1, the limit named
    assert (caught.value.status, caught.value.code, caught.value.limit) == (503, "overloaded", 2)
    assert caught.value.headers() == {"Retry-After": "1"}
    # AND places come back when released (a second release gives nothing back twice)
    first.release()
    first.release()
    assert engine.admitted == 1
    with engine.admit():
        assert engine.admitted == 2
    second.release()
    assert engine.admitted == 0


def test_on_lambda_every_request_is_admitted() -> None:
    engine = Engine(make_settings(max_queued_requests=1, aws_lambda_function_name="llm-function"))

    places = [engine.admit() for _ in range(5)]  # one request per execution environment: nothing to shed

    assert len(places) == 5
