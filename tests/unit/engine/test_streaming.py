"""Stop strings over a stream of deltas: what is sent at once, what is held back, what is never sent."""

from __future__ import annotations

import random

import pytest

from function.engine.streaming import StopHoldBack, first_stop


def stream(deltas: list[str], stops: tuple[str, ...]) -> tuple[StopHoldBack, list[str]]:
    """Feed every delta; return the hold-back and what each feed returned."""
    hold_back = StopHoldBack(stops)
    return hold_back, [hold_back.feed(delta) for delta in deltas]


def non_streamed(deltas: list[str], stops: tuple[str, ...]) -> str:
    """What the engine returns for the same generation: it stops after the delta (token) in which a stop
    string first appears, and cuts the text before the earliest stop string."""
    text = ""
    for delta in deltas:
        text += delta
        cut = first_stop(text, stops)
        if cut is not None:
            return text[:cut]
    return text


def test_first_stop_is_the_earliest_of_any_stop_string() -> None:
    assert first_stop("one two three", ("three", "two")) == 4
    assert first_stop("one two three", ("two", "three")) == 4
    assert first_stop("one two three", ("four",)) is None
    assert first_stop("one two three", ()) is None
    assert first_stop("", ("a",)) is None
    assert first_stop("abab", ("ab",)) == 0


def test_text_that_may_begin_a_stop_string_is_held_back() -> None:
    # GIVEN the stop string "world"
    hold_back = StopHoldBack(("world",))

    # WHEN a delta ends with "wor", which may be its beginning
    sent = hold_back.feed("Hello wor")

    # THEN the text before it is sent and "wor" is held
    assert sent.startswith("Hello")
    assert "w" not in sent

    # AND WHEN the next delta shows it was no stop string, THEN the held text is sent after all
    sent += hold_back.feed("m and the rest of a long sentence")
    assert sent.startswith("Hello worm")


def test_a_stop_string_split_across_deltas_is_never_sent_even_partially() -> None:
    # GIVEN the stop string "STOP" arriving one character at a time, after some text
    deltas = ["abc S", "T", "O", "P tail", "more"]

    # WHEN each delta is fed
    hold_back, sent = stream(deltas, ("STOP",))

    # THEN no piece carries any of the stop string, and together they are the text before it
    assert not any(character in piece for piece in sent for character in "STOP")
    assert "".join(sent) == "abc "
    assert hold_back.finish("abc ") == ""


def test_text_after_a_stop_string_is_never_sent() -> None:
    # GIVEN a delta that holds a whole stop string with text after it
    hold_back = StopHoldBack(("END",))

    # WHEN it and later deltas are fed
    first = hold_back.feed("one END two")
    later = [hold_back.feed(delta) for delta in (" three", "END", " four")]

    # THEN only the text before the stop string is sent, once
    assert first == "one "
    assert later == ["", "", ""]
    assert hold_back.finish("one ") == ""


def test_without_stop_strings_every_delta_is_sent_at_once() -> None:
    # GIVEN no stop strings
    deltas = ["Py", "thon", "이란 ", "무엇", "인가요?", " a", "b"]

    # WHEN the deltas are fed
    hold_back, sent = stream(deltas, ())

    # THEN each comes back whole as it arrives, and nothing is left for the end
    assert sent == deltas
    assert hold_back.finish("".join(deltas)) == ""


@pytest.mark.parametrize("stops", [("zzz", "b"), ("b", "zzz")])
def test_with_several_stop_strings_the_earliest_wins(stops: tuple[str, ...]) -> None:
    # GIVEN two stop strings, "b" appearing before "zzz"
    # WHEN the text arrives in two deltas
    hold_back, sent = stream(["a ", "b c zzz d"], stops)

    # THEN the text is cut before the earlier one, whichever order they were given in
    assert "".join(sent) == "a "
    assert hold_back.finish("a ") == ""


def test_a_longer_stop_string_that_starts_first_wins_over_a_shorter_later_one() -> None:
    # GIVEN "brown fox" (long) and "fox" (short): both complete in the same delta, the long one first
    hold_back, sent = stream(["the quick ", "brown ", "fox jumps"], ("fox", "brown fox"))

    # THEN the text is cut before "brown fox"
    assert "".join(sent) == "the quick "
    assert hold_back.finish("the quick ") == ""


def test_finish_releases_the_held_tail_when_the_stream_ends_without_a_stop() -> None:
    # GIVEN a stream whose last characters could have begun a stop string
    hold_back, sent = stream(["hello wo", "rld ST"], ("STOP",))
    assert not "".join(sent).endswith("ST")

    # WHEN it ends without the stop string (the final text is the whole continuation)
    rest = hold_back.finish("hello world ST")

    # THEN the held-back tail is sent, and everything sent is exactly the final text
    assert "".join(sent) + rest == "hello world ST"


def test_finish_completes_the_text_when_nothing_was_fed() -> None:
    assert StopHoldBack(("x",)).finish("abc") == "abc"
    assert StopHoldBack(("x",)).finish("") == ""


def test_finish_adds_what_decoding_the_whole_text_adds() -> None:
    # GIVEN deltas that stop short of the final text (a streamer can hold back an incomplete character)
    hold_back, sent = stream(["머신", "러"], ("END",))

    # WHEN the final text has more than arrived as deltas
    rest = hold_back.finish("머신러닝")

    # THEN finish sends the difference
    assert "".join(sent) + rest == "머신러닝"


STREAM_TEXTS = [
    "Python이란 무엇인가요? Python은 프로그래밍 언어입니다.",
    "The quick brown fox jumps over the lazy dog. The end.",
    "aaaaab aab ab b",
]
STOP_SETS: list[tuple[str, ...]] = [
    (),
    ("언어",),
    ("fox", "brown fox"),
    ("The end", "lazy"),
    ("ab",),
    ("aab", "b a"),
    ("never", "produced"),
    ("?", "Python은"),
]


@pytest.mark.parametrize("stops", STOP_SETS, ids=[" | ".join(s) or "no-stops" for s in STOP_SETS])
@pytest.mark.parametrize("text", STREAM_TEXTS, ids=["korean", "english", "repeats"])
def test_any_split_of_any_text_adds_up_to_the_non_streamed_text(text: str, stops: tuple[str, ...]) -> None:
    # GIVEN the text split into deltas every which way: one character at a time, and random sizes
    chunker = random.Random(f"{text}{stops}")
    splits = [list(text)]
    for _ in range(20):
        cuts = sorted(chunker.sample(range(1, len(text)), chunker.randint(1, 12)))
        splits.append([text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)], strict=True)])

    for deltas in splits:
        final = non_streamed(deltas, stops)

        # WHEN the deltas are fed one by one
        hold_back = StopHoldBack(stops)
        sent = ""
        for delta in deltas:
            sent += hold_back.feed(delta)
            # THEN what was sent so far is always the beginning of the final text: never a stop string
            # or anything after it, even partially
            assert final.startswith(sent), (deltas, sent, final)

        # AND finish completes it to exactly the final text
        assert sent + hold_back.finish(final) == final, deltas
