"""One `generate` call on the demo model: a cancelled row stops at its next token, the others go on."""

from __future__ import annotations

from function.engine.engine import Engine
from function.engine.generation import run_batch, run_generation
from function.engine.types import SamplingParams
from tests.support.cancellation import CancelAfter

GREEDY = SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0)


def test_a_cancelled_row_stops_at_its_next_token_and_the_other_row_finishes(served_engine: Engine) -> None:
    loaded = served_engine.current
    assert loaded is not None
    first, second = (
        loaded.tokenizer(text, return_tensors="pt") for text in ("Python", "The quick brown fox")
    )
    # GIVEN two prompts that each run past six tokens when generated alone
    assert run_generation(loaded, first, GREEDY).completion_tokens > 6
    alone = run_generation(loaded, second, GREEDY)
    assert alone.completion_tokens > 6

    # WHEN the first row of a two-row call is cancelled after its fifth token
    cancelled, other = run_batch(loaded, [(first, GREEDY), (second, GREEDY)], cancels=[CancelAfter(5), None])

    # THEN it stopped at its sixth token, and the other row's answer is its answer alone
    assert cancelled.completion_tokens == 6
    assert (other.continuations, other.finish_reasons, other.completion_tokens) == (
        alone.continuations,
        alone.finish_reasons,
        alone.completion_tokens,
    )
