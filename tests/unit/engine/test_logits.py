"""The stopping criteria on real token ids of the demo tokenizer: stop strings on the decoded text (a
"\ufffd" among them), and per-row cancellation."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LogitsProcessorList

from function.engine.engine import Engine
from function.engine.generation import decode_continuation
from function.engine.logits import (
    BoundedLogits,
    Cancelled,
    PaddingAwareRepetitionPenalty,
    StopStrings,
    row_processors,
)
from function.engine.types import Cancellation

PROMPT_WIDTH = 2


@pytest.fixture(scope="module")
def tokenizer(served_engine: Engine) -> Any:
    assert served_engine.current is not None
    return served_engine.current.tokenizer


def ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stopped(tokenizer: Any, stops: tuple[str, ...], rows: list[list[int]]) -> list[bool]:
    """One call of a fresh criterion on rows of a 2-token prompt followed by these new ids (shorter rows
    are filled with padding, as rows that finished early are)."""
    prompt = ids(tokenizer, "Hi")[:1] * PROMPT_WIDTH
    width = max(map(len, rows))
    padded = [prompt + row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows]
    criterion = StopStrings(
        lambda context, new: decode_continuation(tokenizer, context, new), stops, PROMPT_WIDTH
    )
    return [bool(flag) for flag in criterion(torch.tensor(padded), None)]


def test_a_stop_string_spread_over_tokens_stops_its_row_only(tokenizer: Any) -> None:
    # GIVEN rows whose new text is "ab" (over two tokens), "a" and "ba"
    a, b = ids(tokenizer, "a"), ids(tokenizer, "b")

    # WHEN "ab" is the stop string
    flags = stopped(tokenizer, ("ab",), [a + b, a + a, b + a])

    # THEN only the row that holds it stops
    assert flags == [True, False, False]


def test_a_replacement_character_stop_matches_invalid_bytes_not_a_split_character(tokenizer: Any) -> None:
    # GIVEN a character the demo tokenizer writes as three byte tokens, and "a"
    char = ids(tokenizer, "鑫")
    assert len(char) == 3 and tokenizer.decode(char[:1]) == "\ufffd"
    a = ids(tokenizer, "a")

    flags = stopped(
        tokenizer,
        ("\ufffd",),
        [
            char[:1],  # the character's first byte: the rest may still come
            char,  # the whole character
            char[:1] + a,  # its first byte, then text: an invalid sequence, decoded as "\ufffd"
        ],
    )

    # THEN only the invalid bytes stop: transformers' byte matching never saw them (their bytes are not
    # the UTF-8 of "\ufffd"), and a character split over tokens is not one
    assert flags == [False, False, True]


def test_the_tail_of_a_long_text_is_checked(tokenizer: Any) -> None:
    # GIVEN 600 new tokens, the stop string only in the last two
    filler = ids(tokenizer, " Python") * 598
    row = filler + ids(tokenizer, "a") + ids(tokenizer, "b")

    # THEN the row stops, and the same text without the stop string does not
    assert stopped(tokenizer, ("ab",), [row, filler + filler[:2]]) == [True, False]


def test_cancelled_rows_stop_and_the_others_go_on() -> None:
    # GIVEN three rows, the second cancelled, the third without a cancellation
    cancel, other = Cancellation(), Cancellation()
    cancel.cancel()

    # WHEN the criterion is asked after a token
    flags = Cancelled([other, cancel, None])(torch.zeros((3, 5), dtype=torch.long), None)

    # THEN only the cancelled row stops; a child cancellation follows its parent
    assert flags.tolist() == [False, True, False]
    assert Cancellation(parent=cancel).cancelled and not Cancellation(parent=other).cancelled


def test_each_rows_processors_alone_give_what_the_batchs_give_that_row() -> None:
    """`row_processors`: a row's penalty with its own padding, on its ids alone (the drafts' contexts,
    function.engine.speculation), bitwise the batch call's row."""
    generator = torch.Generator().manual_seed(0)
    pads = [3, 0, 5]
    batch: Any = torch.randint(1, 50, (3, 9), generator=generator)  # ids: a LongTensor
    batch[0, :3], batch[2, :5] = 0, 0  # the padding's id also occurs in row 1's own tokens
    batch[1, 4] = 0
    scores = torch.randn(3, 60, generator=generator) * 5
    processors = [PaddingAwareRepetitionPenalty(1.3, pads), BoundedLogits()]

    together = LogitsProcessorList(processors)(batch, scores)
    alone = [row_processors(processors, row) for row in range(3)]

    for row, views in enumerate(alone):
        assert views is not None
        assert torch.equal(views(batch[row : row + 1], scores[row : row + 1])[0], together[row])
    other = alone[1]  # another row's padding: another result (the check above is not vacuous)
    assert other is not None and not torch.equal(other(batch[0:1], scores[0:1])[0], together[0])


def test_a_processor_without_a_rows_view_has_none() -> None:
    class Opaque:
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            return scores

    assert row_processors([BoundedLogits(), Opaque()], 0) is None
