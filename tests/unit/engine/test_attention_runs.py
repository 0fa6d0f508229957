"""Exact batches' attention (function.engine.decoder): neighbouring rows of one length attend in one
call, bitwise as each alone, where calibration measured that they can; else each row alone."""

from __future__ import annotations

from typing import Any

import torch

from function.engine.calibration import calibrate
from function.engine.decoder import Decoder, _runs
from tests.unit.engine.test_decoder import fused_copy, tiny

PROMPTS = [[12, 80, 7], [9, 4, 33], [50, 51, 2], [3, 14, 15]]  # one length: one run


def test_runs_join_neighbouring_cache_rows_that_end_at_one_column() -> None:
    rows, ends = [0, 1, 2, 4, 5, 6], [7, 7, 9, 9, 9, 8]

    # rows 2 and 4 end alike but are not neighbours in the cache: their keys are not one slice
    assert _runs(rows, ends, joined=True) == [(0, 2, 0, 7), (2, 3, 2, 9), (3, 5, 4, 9), (5, 6, 6, 8)]
    assert _runs(rows, ends, joined=False) == [
        (0, 1, 0, 7),
        (1, 2, 1, 7),
        (2, 3, 2, 9),
        (3, 4, 4, 9),
        (4, 5, 5, 9),
        (5, 6, 6, 8),
    ]


def step_together(decoder: Decoder, calls: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """One exact step of the 4 prompts batched, and each alone; `calls`: each attention call's rows."""
    attend = decoder._attend

    def spying(q: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(q.shape[0])
        return attend(q, *args)

    prompts = [torch.tensor(prompt) for prompt in PROMPTS]
    cache = decoder.new_cache(len(prompts), 6)
    for row, prompt in enumerate(prompts):
        decoder.prefill_row(prompt, cache, row)
    tokens, positions = torch.tensor([[4], [8], [15], [16]]), torch.tensor([[3]] * len(prompts))
    decoder._attend = spying  # type: ignore[method-assign,assignment]  # a spy: the real attention runs
    try:
        together = decoder.step_rows(tokens, positions, cache)
    finally:
        del decoder._attend
    alone = []
    for row, prompt in enumerate(prompts):
        single = decoder.new_cache(1, 6)
        decoder.forward(prompt[None], torch.arange(3)[None], single, 0)
        alone.append(decoder.forward(tokens[row : row + 1], torch.tensor([[3]]), single, 3)[0])
    return together, torch.stack(alone)


def test_rows_of_one_length_attend_in_one_call_bitwise_as_alone() -> None:
    decoder = Decoder(fused_copy(tiny("qwen2", torch.bfloat16)))
    calls: list[int] = []
    with torch.inference_mode():
        assert calibrate(decoder, 4) and decoder.attend_runs
        together, alone = step_together(decoder, calls)

    assert calls == [4] * len(decoder.layers)  # one call a layer for the 4 rows
    assert torch.equal(together, alone)


class JoinedRoundsDifferently:
    """An attention whose rounding differs when rows attend in one call, as a kernel's could."""

    def __init__(self, attend: Any) -> None:
        self.attend = attend

    def __call__(self, q: torch.Tensor, *args: Any) -> torch.Tensor:
        attended: torch.Tensor = self.attend(q, *args)
        return attended + 0.5 * (q.shape[0] > 1)


def test_calibration_keeps_rows_apart_where_one_call_rounds_differently() -> None:
    decoder = Decoder(fused_copy(tiny("qwen2", torch.bfloat16)))
    decoder._attend = JoinedRoundsDifferently(decoder._attend)  # type: ignore[method-assign,assignment]
    calls: list[int] = []
    with torch.inference_mode():
        assert calibrate(decoder, 4)  # rows attending alone still decode bitwise as alone
        assert not decoder.attend_runs
        together, alone = step_together(decoder, calls)

    assert calls == [1] * 4 * len(decoder.layers)
    assert torch.equal(together, alone)
