"""Whether a batch's rows decode bitwise as each row alone, measured at load (`calibrate`).

Our decoder (function.engine.decoder) gives each batched row its own prefill and attention, so only
its matmuls see the batch. This measures, on this machine and model, the row counts for which they
round each row as a one-row call does, and sets `Decoder.least_rows`, `measured_rows` and
`batch_exact`; the micro-batcher batches greedy requests on it (function.engine.batching).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.nn import functional

from function.engine.decoder import Decoder

CALIBRATED_ROWS = 16  # most rows per matmul call measured (the cost grows with their square)


def calibrate(decoder: Decoder, max_batch: int, seed: int = 0, trials: int = 16) -> bool:
    """Measure, on this machine and model, whether batched rows decode bitwise as alone.

    A matmul kernel may take another path (another order of additions) for another number of
    rows. Measured on SmolLM2-135M in bfloat16: every call of 2 to 8 rows rounded each row alike,
    but a one-row call of the 1536-wide down projection took another path (it differed on 9 of
    30 random inputs). So for each projection: the fewest rows (1, else 2, padding with zeros)
    for which every call of up to `max_batch` rows gives each row bitwise as a call of that row
    alone, over `trials` random inputs. Then a batch of random prompts of different lengths,
    prefilled and decoded a few steps together, must give each row's logits bitwise as alone, with
    rows that attend to the same columns in one call (`decoder.attend_runs`); where that fails, again
    with each row attending alone (`attend_runs` off). Sets and returns
    `decoder.batch_exact` (False: batches may round rows differently). At most
    `CALIBRATED_ROWS` rows are measured (the cost grows with their square); bigger batches run
    their matmuls in calls of that many rows."""
    max_batch = min(max_batch, CALIBRATED_ROWS)
    decoder.measured_rows = max_batch
    generator = torch.Generator().manual_seed(seed)
    layer = decoder.layers[0] if decoder.layers else None
    projections = [layer.qkv, layer.o, layer.gate_up, layer.down] if layer is not None else []
    widths = [
        decoder.hidden_size,
        decoder.heads * decoder.head_dim,
        decoder.hidden_size,
        decoder.intermediate,
    ]
    decoder.least_rows = least_rows = {}  # filled as measured: `_project` reads it
    for projection, width in zip([*projections, decoder.head], [*widths, decoder.hidden_size], strict=True):
        inputs = [  # gated activations, as a layer's are: many values near zero
            functional.silu(torch.randn(max_batch, 1, width, generator=generator))
            * torch.randn(max_batch, 1, width, generator=generator)
            for _ in range(trials)
        ]
        least = next((least for least in (1, 2) if _rows_agree(decoder, projection, inputs, least)), None)
        if least is None:
            decoder.least_rows, decoder.batch_exact = {}, False
            return False
        least_rows[id(projection)] = least
    for other in decoder.layers[1:]:  # the same shapes in every layer: the same kernels
        for mine, theirs in zip(projections, [other.qkv, other.o, other.gate_up, other.down], strict=True):
            least_rows[id(theirs)] = least_rows[id(mine)]
    decoder.block_spans = True  # rows attend to whole blocks, alone as batched
    decoder.attend_runs = True  # a block's rows in one call; where that is not exact, each row alone
    decoder.batch_exact = rows_as_alone(decoder, max_batch, generator)
    if not decoder.batch_exact:
        decoder.attend_runs = False
        decoder.batch_exact = rows_as_alone(decoder, max_batch, generator)
    if not decoder.batch_exact:
        decoder.least_rows, decoder.block_spans = {}, False
    return decoder.batch_exact


def _rows_agree(decoder: Decoder, projection: Any, inputs: list[torch.Tensor], least: int) -> bool:
    decoder.least_rows[id(projection)] = least
    for x in (x.to(decoder.dtype) for x in inputs):
        alone = torch.cat([decoder._project(projection, x[row : row + 1]) for row in range(x.shape[0])])
        for rows in range(2, x.shape[0] + 1):
            if not torch.equal(decoder._project(projection, x[:rows]), alone[:rows]):
                return False
    return True


def rows_as_alone(decoder: Decoder, batch: int, generator: torch.Generator) -> bool:
    """Whether random prompts of different lengths, prefilled and decoded a few steps as a batch,
    give each row's logits bitwise as alone (their rows attend in one call where
    `decoder.attend_runs`: they all end in one block)."""
    lengths = [1 + row % 5 for row in range(batch)]
    vocabulary = int(decoder.embed.num_embeddings)
    prompts = [torch.randint(vocabulary, (length,), generator=generator) for length in lengths]
    tokens = torch.randint(vocabulary, (3, batch, 1), generator=generator)
    together, alone = [], []
    longest = max(lengths) + len(tokens)
    cache = decoder.new_cache(batch, longest)
    together.append(
        torch.cat([decoder.prefill_row(prompt, cache, row) for row, prompt in enumerate(prompts)])
    )
    positions = torch.tensor([[len(prompt)] for prompt in prompts])
    for step in tokens:
        together.append(decoder.step_rows(step, positions, cache))
        positions = positions + 1
    for row, prompt in enumerate(prompts):
        single = decoder.new_cache(1, longest)
        logits = [decoder.forward(prompt[None], torch.arange(len(prompt))[None], single, 0)]
        for step_index, step in enumerate(tokens):
            at = len(prompt) + step_index
            logits.append(decoder.forward(step[row : row + 1], torch.tensor([[at]]), single, at))
        alone.append(torch.cat(logits))
    return all(torch.equal(torch.stack([step[row] for step in together]), alone[row]) for row in range(batch))
