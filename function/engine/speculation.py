"""Greedy decoding that drafts tokens from a row's own text and checks them in one step (prompt
lookup decoding, as transformers' `prompt_lookup_num_tokens` and vLLM's n-gram speculator do).

A one-row decode step on CPU is bound by reading the weights, so a step of a few rows costs little
more than a step of one (SmolLM2-135M, bf16, 2 cores: 4 rows about 1.3x one row). Where a row's
last tokens occurred earlier in its prompt or its output, the tokens that followed then are a
draft; the row's last token and its draft go through the model as rows of one step, each at its
own cache column and attending to the columns up to it (`Decoder.step_rows` with the row repeated).
The draft's tokens are kept up to the first the model would not have chosen, and the model's own
choice after them is kept too: 1 to `1 + draft` tokens a step. A rejected draft's keys are written
over by the next step before anything attends to them.

Exact: each step's rows decode bitwise as alone (our decoder measured it at load, or
its matmuls are all our own: `Decoder.batch_exact`), so each kept token is the argmax of the same
logits the one-token loop computes, and the answer is the same text. So it runs for greedy
requests, on decoders whose rows decode as alone, with a repetition penalty too (each draft
token's penalty is applied in its own context).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from function.engine.decoder import Decoder

# The suffix lengths looked up, longest first (a 1-token match drafts too often in vain).
LOOKUP_NGRAMS = (3, 2)
Queue = list[tuple[int, torch.Tensor]]  # a row's tokens chosen, not yet emitted, with their logits


class PromptLookup:
    """One row's tokens (prompt, then output) and where each of their n-grams last occurred with a
    token after it."""

    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        # n-gram -> the index of the token after its latest occurrence
        self.after: dict[tuple[int, ...], int] = {}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        tokens = self.tokens
        tokens.append(token)
        end = len(tokens) - 1  # the n-grams ending just before this token now have a token after them
        for n in LOOKUP_NGRAMS:
            if end >= n:
                self.after[tuple(tokens[end - n : end])] = end

    def draft(self, limit: int) -> list[int]:
        """Up to `limit` tokens that followed the latest earlier occurrence of the row's last 3 tokens,
        else its last 2; none where neither occurred before."""
        if limit <= 0:
            return []
        for n in LOOKUP_NGRAMS:
            start = self.after.get(tuple(self.tokens[-n:])) if len(self.tokens) >= n else None
            if start is not None:
                return self.tokens[start : start + limit]
        return []


def decode_with_lookup(
    decoder: Decoder,
    ids: torch.Tensor,
    logits: torch.Tensor,
    prompts: list[torch.Tensor],
    cache: Any,
    criteria: Any,
    streamer: Any,
    max_new: int,
    pad_id: torch.Tensor,
    processors: list[Any] | None = None,
) -> torch.Tensor:
    """`decode_loop.decode`'s greedy loop, with drafts: `ids` the left-padded prompts, `logits` their
    prefills' (each prompt alone at columns 0.. of its cache row). Returns the ids as that loop does.
    `processors` (a repetition penalty), one list a row (`logits.row_processors`): applied to each
    draft token's logits in its own context, the row's ids and the draft before it, as the one-token
    loop applies the batch's to that row.

    Each iteration emits one token for every row, as the one-token loop does (the stopping
    criteria and the streamer see the same sequence of calls); a row steps the model only when the
    tokens its last step kept are all emitted. A step's rows are the rows that need a step, then
    drafts while rows are left: as many as the batch began with, or a row and its drafts
    (`lookup_tokens + 1`) where that is more. A batch of 8 busy rows drafts nothing; as rows finish,
    or skip steps with tokens kept, drafts take their place (8 clients on the example model: 1.01-1.04x
    without drafts; more rows than the batch's lost, 0.85x, on oneDNN's matmuls; on ours a step past 8
    rows still costs about 0.6 ms a row, docs/benchmarks.md)."""
    batch = len(prompts)
    if processors is not None and len(processors) != batch:
        raise ValueError("one list of logits processors a row")
    budget = max(batch, decoder.lookup_tokens + 1)  # never more rows than the batch began with
    lookups = [PromptLookup(prompt.tolist()) for prompt in prompts]

    def score(row: int, prefix: list[int], row_logits: torch.Tensor) -> torch.Tensor:
        """A token's scores after the row's ids (as they are now) and the draft before it."""
        if processors is None:
            return row_logits
        context = ids[row : row + 1]
        if prefix:
            context = torch.cat((context, torch.tensor([prefix], dtype=ids.dtype)), dim=-1)
        processed: torch.Tensor = processors[row](context, row_logits[None])[0]
        return processed

    queued: list[Queue] = [[] for _ in range(batch)]
    _keep(queued, list(range(batch)), logits.float(), [[] for _ in range(batch)], score)
    columns = [len(prompt) for prompt in prompts]  # where each row's next model input goes
    unfinished = torch.ones(batch, dtype=torch.long)
    finished_scores = torch.zeros(logits.shape[-1])
    for step in range(max_new):
        live = unfinished.nonzero()[:, 0].tolist()
        needing = [row for row in live if not queued[row]]
        if needing:
            drafts = _drafts([lookups[row] for row in needing], budget - len(needing), max_new - 1 - step)
            last = [lookups[row].tokens[-1] for row in needing]
            _keep(
                queued,
                needing,
                _step(decoder, cache, needing, last, drafts, [columns[row] for row in needing]),
                drafts,
                score,
            )
        finished = (int(pad_id), finished_scores)
        chosen = [queued[row].pop(0) if unfinished[row] else finished for row in range(batch)]
        tokens = torch.tensor([token for token, _ in chosen])
        scores = torch.stack([row_scores for _, row_scores in chosen])
        ids = torch.cat((ids, tokens[:, None]), dim=-1)
        unfinished = unfinished & ~criteria(ids, scores)
        if streamer is not None:
            streamer.put(tokens)
        for row in live:
            lookups[row].append(int(tokens[row]))
        if unfinished.max() == 0 or step == max_new - 1:
            break
        for row in needing:  # the inputs its step kept now hold keys; the next goes after them
            columns[row] += 1 + len(queued[row])
    return ids


def _drafts(lookups: list[PromptLookup], spare: int, remaining: int) -> list[list[int]]:
    """Each row's draft, in order, while `spare` rows are left in the step, none past the `remaining`
    tokens the request may still produce after the next."""
    drafts = []
    for lookup in lookups:
        draft = lookup.draft(min(spare, remaining))
        spare -= len(draft)
        drafts.append(draft)
    return drafts


def _step(
    decoder: Decoder,
    cache: Any,
    rows: list[int],
    last: list[int],
    drafts: list[list[int]],
    columns: list[int],
) -> torch.Tensor:
    """Logits after each row's last token and after each of its draft's tokens, float32."""
    tokens: list[int] = []
    positions: list[int] = []
    cache_rows: list[int] = []
    for row, token, draft, column in zip(rows, last, drafts, columns, strict=True):
        inputs = [token, *draft]
        tokens += inputs
        positions += range(column, column + len(inputs))
        cache_rows += [row] * len(inputs)
    return decoder.step_rows(
        torch.tensor(tokens)[:, None], torch.tensor(positions)[:, None], cache, exact=True, rows=cache_rows
    ).float()


def _keep(
    queued: list[Queue],
    rows: list[int],
    logits: torch.Tensor,
    drafts: list[list[int]],
    score: Callable[[int, list[int], torch.Tensor], torch.Tensor],
) -> None:
    """Queue each row's chosen tokens: the argmax of the scores (`score`: the logits processed in
    their context) after its last token, and after each draft token the model chose too (a draft is
    kept up to its first token the model would not have chosen)."""
    at = 0
    for row, draft in zip(rows, drafts, strict=True):
        for index in range(len(draft) + 1):
            scores = score(row, draft[:index], logits[at + index])
            choice = int(torch.argmax(scores))
            queued[row].append((choice, scores))
            if index == len(draft) or draft[index] != choice:
                break
        at += len(draft) + 1
