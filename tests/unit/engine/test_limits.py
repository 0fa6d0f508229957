"""Bounds on stop strings and chat messages, through the engine: at the limit accepted, above it a 422
naming the field and the limit, before anything is generated."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from function.engine.engine import Engine
from function.engine.types import SamplingParams
from function.errors import InvalidRequestError
from tests.support.settings import make_settings

GREEDY = SamplingParams(max_new_tokens=2, temperature=0, repetition_penalty=1.0)
MESSAGES = [{"role": "user", "content": "Python"}]


def engine_with(model_dir: Path, **limits: int) -> Engine:
    engine = Engine(make_settings(model_path=str(model_dir), **limits))
    engine.load_startup_model()
    return engine


@pytest.fixture(scope="module")
def small_caps(demo_model_dir: Path) -> Engine:
    """Stop strings of at most 10 characters, 15 in all; the token cap out of the way."""
    return engine_with(
        demo_model_dir, max_stop_string_chars=10, max_stop_total_chars=15, max_stop_string_tokens=1000
    )


def refused(call: Callable[[], object]) -> InvalidRequestError:
    with pytest.raises(InvalidRequestError) as caught:
        call()
    assert caught.value.status == 422
    return caught.value


def with_stop(*stops: str) -> SamplingParams:
    return SamplingParams(max_new_tokens=2, temperature=0, repetition_penalty=1.0, stop=stops)


def test_each_stop_string_is_capped_in_characters(small_caps: Engine) -> None:
    # GIVEN a stop string at the cap: accepted, streamed or not
    assert small_caps.generate("Python", with_stop("a" * 10)).continuations
    assert list(small_caps.stream("Python", with_stop("a" * 10)))

    # WHEN one is a character over it, on any route into the engine
    for call in (
        lambda: small_caps.generate("Python", with_stop("b", "a" * 11)),
        lambda: small_caps.chat("Python", "", with_stop("a" * 11)),
        lambda: small_caps.chat_messages(MESSAGES, with_stop("a" * 11)),
        lambda: small_caps.stream("Python", with_stop("a" * 11)),
    ):
        error = refused(call)

        # THEN 422 on the field, with the cap, and which string it was
        assert (error.field, error.limit) == ("stop", 10)
        assert "stop[" in error.message and "11" in error.message


def test_all_stop_strings_together_are_capped(small_caps: Engine) -> None:
    assert small_caps.generate("Python", with_stop("a" * 8, "b" * 7)).continuations  # 15: the cap

    error = refused(lambda: small_caps.generate("Python", with_stop("a" * 8, "b" * 8)))

    assert (error.field, error.limit) == ("stop", 15)


def test_each_stop_string_is_capped_in_tokens_of_the_served_tokenizer(demo_model_dir: Path) -> None:
    # GIVEN a stop string of n tokens of the demo tokenizer, and the cap set to n
    probe = engine_with(demo_model_dir)
    assert probe.current is not None
    stop = "Python 머신러닝 zq"
    tokens = len(probe.current.tokenizer(stop, add_special_tokens=False)["input_ids"])
    engine = engine_with(demo_model_dir, max_stop_string_tokens=tokens)

    # THEN it is accepted, and one with a token more is refused with the cap
    assert engine.generate("Python", with_stop(stop)).continuations
    error = refused(lambda: engine.generate("Python", with_stop(stop + "q")))
    assert (error.field, error.limit) == ("stop", tokens)
    assert "tokens" in error.message


def test_the_issues_four_huge_stop_strings_are_refused_before_any_work(served_engine: Engine) -> None:
    # GIVEN the default caps (200 characters each) and four stop strings of 250,000 characters, which once
    # held the generation lock 38 s and took 13.6 GB (transformers' table over the vocabulary)
    params = with_stop(*(letter * 250_000 for letter in "abcd"))

    error = refused(lambda: served_engine.generate("Python", params))

    assert (error.field, error.limit) == ("stop", served_engine.settings.max_stop_string_chars)


def test_character_caps_are_checked_before_the_model_is_needed(tmp_path: Path) -> None:
    # GIVEN an engine with no model at all
    engine = Engine(make_settings(model_path=str(tmp_path / "missing")))

    # THEN an over-long stop string is its error, not the missing model
    assert refused(lambda: engine.generate("Python", with_stop("a" * 201))).field == "stop"


def test_chat_messages_are_capped_in_number(demo_model_dir: Path) -> None:
    engine = engine_with(demo_model_dir, max_messages=3)
    assert engine.chat_messages(MESSAGES * 3, GREEDY).continuations  # at the cap

    for call in (
        lambda: engine.chat_messages(MESSAGES * 4, GREEDY),
        lambda: engine.stream(MESSAGES * 4, GREEDY),
    ):
        error = refused(call)

        assert (error.field, error.limit) == ("messages", 3)
        assert "4" in error.message
