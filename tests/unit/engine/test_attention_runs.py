"""Exact batches' attention (function.engine.decoder): a decoding row attends to its columns up to a
whole block, alone or in a batch; neighbouring rows of one block attend in one call, bitwise as each
alone, where calibration measured that they can; else each row alone."""

from __future__ import annotations

from typing import Any

import torch

from function.engine.calibration import calibrate
from function.engine.decoder import Decoder, _runs, _span
from function.engine.kv_cache import BLOCK
from tests.support.tiny_models import fused_copy, tiny


def test_runs_join_neighbouring_cache_rows_that_attend_to_the_same_columns() -> None:
    rows, spans = [0, 1, 2, 4, 5, 6], [64, 64, 128, 128, 128, 64]

    # rows 2 and 4 span alike but are not neighbours in the cache: their keys are not one slice
    assert _runs(rows, spans, joined=True) == [(0, 2, 0, 64), (2, 3, 2, 128), (3, 5, 4, 128), (5, 6, 6, 64)]
    assert _runs(rows, spans, joined=False) == [
        (0, 1, 0, 64),
        (1, 2, 1, 64),
        (2, 3, 2, 128),
        (3, 4, 4, 128),
        (4, 5, 5, 128),
        (5, 6, 6, 64),
    ]
    assert [_span(end, True) for end in (1, BLOCK, BLOCK + 1)] == [BLOCK, BLOCK, 2 * BLOCK]
    assert [_span(end, False) for end in (1, BLOCK, BLOCK + 1)] == [1, BLOCK, BLOCK + 1]


def decoded(decoder: Decoder, lengths: list[int], steps: int, calls: list[int]) -> tuple[Any, Any]:
    """Prompts of `lengths` decoded `steps` exact steps as a batch, and each alone: both logits,
    [steps, rows, vocabulary]. `calls` gets the rows of each attention call of the batch's steps."""
    generator = torch.Generator().manual_seed(3)
    vocabulary = int(decoder.embed.num_embeddings)
    prompts = [torch.randint(2, vocabulary, (length,), generator=generator) for length in lengths]
    tokens = torch.randint(2, vocabulary, (steps, len(lengths), 1), generator=generator)
    longest = max(lengths) + steps
    cache = decoder.new_cache(len(prompts), longest)
    for row, prompt in enumerate(prompts):
        decoder.prefill_row(prompt, cache, row)
    attend = decoder._attend

    def spying(q: torch.Tensor, *args: Any) -> torch.Tensor:
        calls.append(q.shape[0])
        return attend(q, *args)

    decoder._attend = spying  # type: ignore[method-assign,assignment]  # a spy: the real attention runs
    try:
        positions = torch.tensor([[length] for length in lengths])
        together = [decoder.step_rows(tokens[step], positions + step, cache) for step in range(steps)]
    finally:
        del decoder._attend
    alone = []
    for row, prompt in enumerate(prompts):
        single = decoder.new_cache(1, longest)
        decoder.forward(prompt[None], torch.arange(len(prompt))[None], single, 0)
        at = len(prompt)
        alone.append(
            [
                decoder.forward(tokens[step, row : row + 1], torch.tensor([[at + step]]), single, at + step)[
                    0
                ]
                for step in range(steps)
            ]
        )
    return torch.stack(together), torch.stack([torch.stack(row) for row in alone], dim=1)


def test_rows_of_one_block_attend_in_one_call_bitwise_as_alone() -> None:
    decoder = Decoder(fused_copy(tiny("qwen2", torch.bfloat16)))
    calls: list[int] = []
    with torch.inference_mode():
        assert calibrate(decoder, 4) and decoder.attend_runs
        together, alone = decoded(decoder, [3, 1, 5, 2], 2, calls)

    assert calls == [4] * 2 * len(decoder.layers)  # one call a layer for the 4 rows, each step
    assert torch.equal(together, alone)


def test_rows_crossing_into_the_next_block_leave_the_call_and_stay_bitwise_as_alone() -> None:
    decoder = Decoder(fused_copy(tiny("qwen2", torch.bfloat16)))
    calls: list[int] = []
    with torch.inference_mode():
        assert calibrate(decoder, 4) and decoder.attend_runs
        # the first two rows' keys pass column 64 at the 2nd and the 3rd step; the last row's are beyond it
        together, alone = decoded(decoder, [BLOCK - 1, BLOCK - 2, 4, 70], 3, calls)

    layers = len(decoder.layers)
    assert calls == [3, 1] * layers + [1, 2, 1] * layers + [2, 1, 1] * layers
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
        together, alone = decoded(decoder, [3, 1, 5, 2], 1, calls)

    assert calls == [1] * 4 * len(decoder.layers)
    assert torch.equal(together, alone)


def test_only_a_decoder_calibrated_for_exact_batches_attends_to_whole_blocks() -> None:
    decoder = Decoder(fused_copy(tiny("qwen2", torch.bfloat16)))
    seen: list[tuple[int, bool]] = []  # each attention call's columns, and whether it masked any
    attend = decoder._attend

    def spying(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, hidden: Any) -> torch.Tensor:
        seen.append((keys.shape[2], hidden is not None))
        return attend(q, keys, values, hidden)

    def one_step() -> None:
        cache = decoder.new_cache(1, 8)
        decoder.forward(torch.tensor([[5, 17, 42]]), torch.arange(3)[None], cache, 0)
        decoder._attend = spying  # type: ignore[method-assign]  # a spy: the real attention runs
        try:
            decoder.forward(torch.tensor([[3]]), torch.tensor([[3]]), cache, 3)
        finally:
            del decoder._attend

    with torch.inference_mode():
        one_step()  # alone, no batcher (Lambda): its 4 keys, no mask
        assert calibrate(decoder, 2) and decoder.block_spans
        one_step()  # as it would in a batch: the block, masked beyond its keys

    layers = len(decoder.layers)
    assert seen == [(4, False)] * layers + [(BLOCK, True)] * layers
