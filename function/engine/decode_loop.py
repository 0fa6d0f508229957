"""`generate` for our decoder: transformers' sampling loop (`GenerationMixin._sample`), step for step,
for the options `run_batch` uses.

Same inputs (left-padded ids and their mask, a GenerationConfig, logits processors, stopping
criteria, a streamer) and the same output (the ids, prompt included, one row per sequence), so
`run_batch` calls one or the other. The order of each step is transformers': float32 logits of
the last position, our processors, then temperature / top-k / top-p with transformers' own
warpers, a multinomial draw (or the argmax), finished rows filled with the pad id, the stopping
criteria, the streamer.
"""

from __future__ import annotations

import time
from typing import Any, cast

import torch
from transformers import (
    LogitsProcessorList,
    StoppingCriteriaList,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxTimeCriteria

from function.engine.decoder import Decoder
from function.engine.logits import row_processors
from function.engine.speculation import decode_with_lookup


def decode(
    decoder: Decoder,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    config: Any,
    logits_processor: LogitsProcessorList,
    stopping_criteria: StoppingCriteriaList | None = None,
    streamer: Any = None,
) -> torch.Tensor:
    started = time.time()
    copies = config.num_return_sequences or 1
    if copies > 1:  # each prompt's samples next to each other, as transformers lays them out
        input_ids = input_ids.repeat_interleave(copies, dim=0)
        attention_mask = attention_mask.repeat_interleave(copies, dim=0)
    processors = LogitsProcessorList(list(logits_processor))
    if config.do_sample:
        if config.temperature is not None and config.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(config.temperature))
        if config.top_k is not None and config.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=config.top_k, min_tokens_to_keep=1))
        if config.top_p is not None and config.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=config.top_p, min_tokens_to_keep=1))
    criteria = StoppingCriteriaList()
    if config.max_time is not None:
        criteria.append(MaxTimeCriteria(max_time=config.max_time, initial_timestamp=started))
    eos = config.eos_token_id
    if eos is not None:
        criteria.append(EosTokenCriteria(eos_token_id=torch.tensor(eos if isinstance(eos, list) else [eos])))
    criteria.extend(stopping_criteria or [])
    pad_id = torch.tensor(config.pad_token_id if config.pad_token_id is not None else 0)

    batch = input_ids.shape[0]
    max_new = int(config.max_new_tokens)
    # Each row without its padding: its prompt alone at columns 0.., its new tokens after it.
    prompts = [row[mask.bool()] for row, mask in zip(input_ids, attention_mask, strict=True)]
    cache = decoder.new_cache(batch, max(len(prompt) for prompt in prompts) + max_new)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    logits = torch.cat([decoder.prefill_row(prompt, cache, row) for row, prompt in enumerate(prompts)])
    drafting = bool(decoder.lookup_tokens and decoder.batch_exact and not config.do_sample)
    # each row's processors alone, for its drafts' contexts (None: not every processor has a row's view)
    rows = [row_processors(processors, row) for row in range(batch)] if drafting and processors else None
    if drafting and (rows is None or all(row is not None for row in rows)):
        # greedy, on rows that decode bitwise as alone: drafts from each row's own text, checked
        output = decode_with_lookup(
            decoder, input_ids, logits, prompts, cache, criteria, streamer, max_new, pad_id, rows
        )
        if streamer is not None:
            streamer.end()
        return output
    positions = torch.tensor([[len(prompt)] for prompt in prompts])
    # Greedy rows batched because they decode bitwise as alone must; sampled rows, float32's and
    # BATCH_REDUCED_PRECISION's batches attend together (see batching.exact_batching).
    exact = decoder.batch_exact and not config.do_sample
    unfinished = torch.ones(batch, dtype=torch.long)
    ids = input_ids
    for step in range(max_new):
        scores = processors(cast(Any, ids), logits.float())
        if config.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            tokens = torch.argmax(scores, dim=-1)
        tokens = tokens * unfinished + pad_id * (1 - unfinished)
        ids = torch.cat((ids, tokens[:, None]), dim=-1)
        unfinished = unfinished & ~criteria(cast(Any, ids), scores)
        if streamer is not None:
            streamer.put(tokens.cpu())
        if unfinished.max() == 0 or step == max_new - 1:
            break
        if batch == 1:
            at = int(positions[0, 0])
            logits = decoder.forward(tokens[:, None], positions, cache, at)
        elif exact:  # rows are independent: finished ones are left out (their logits go unused)
            live = unfinished.nonzero()[:, 0]
            logits[live] = decoder.step_rows(
                tokens[live, None], positions[live], cache, exact=True, rows=live.tolist()
            )
        else:
            logits = decoder.step_rows(tokens[:, None], positions, cache, exact=False)
        positions = positions + 1
    if streamer is not None:
        streamer.end()
    return ids
