"""Logits processors and stopping criteria that `run_batch` hands to transformers' `generate`.

Importing this module imports torch and transformers: `function.engine.generation` imports it
when it first generates, so the engine's other modules stay light.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria

from function.engine.streaming import first_stop
from function.engine.types import Cancellation

LOGIT_BOUND = 1e4  # far beyond any real model's logits; keeps extreme penalties finite


class BoundedLogits(LogitsProcessor):  # type: ignore[misc]
    """After the repetition penalty, before temperature: logits stay finite (a penalty of 1e-300 is valid)."""

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        return torch.nan_to_num(scores, nan=-LOGIT_BOUND).clamp(-LOGIT_BOUND, LOGIT_BOUND)

    def for_row(self, row: int) -> BoundedLogits:
        """The same for one row of the batch alone (`row_processors`): nothing is per row."""
        return self


class PaddingAwareRepetitionPenalty(LogitsProcessor):  # type: ignore[misc]
    """transformers' repetition penalty (CTRL's), blind to each row's left padding: a padded row is
    penalized exactly as the same prompt alone would be."""

    def __init__(self, penalty: float, row_pads: list[int]) -> None:
        self.penalty = penalty
        self.pads = torch.tensor(row_pads)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        vocab = scores.shape[-1]
        pads = self.pads.to(input_ids.device)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        # Padding (and ids beyond the output vocabulary) point at one extra column, dropped below.
        ids = input_ids.clamp(max=vocab).masked_fill(positions[None, :] < pads[:, None], vocab)
        widened = torch.nn.functional.pad(scores, (0, 1))
        score = torch.gather(widened, 1, ids)
        score = torch.where(score < 0, score * self.penalty, score / self.penalty)
        return widened.scatter(1, ids, score)[..., :vocab]

    def for_row(self, row: int) -> PaddingAwareRepetitionPenalty:
        """The penalty of row `row` of the batch alone, with that row's padding (`row_processors`)."""
        return PaddingAwareRepetitionPenalty(self.penalty, [int(self.pads[row])])


def row_processors(processors: Sequence[Any], row: int) -> LogitsProcessorList | None:
    """`processors` for row `row` of their batch alone: called with that row's ids (its padding
    included) and logits, each gives bitwise what the batch's call gives that row (every op is a
    row's own). None where one of them has no such view."""
    if not all(hasattr(processor, "for_row") for processor in processors):
        return None
    return LogitsProcessorList([processor.for_row(row) for processor in processors])


class RowLimits(StoppingCriteria):  # type: ignore[misc]
    """Each row stops at its own max_new_tokens (the batch runs to the largest)."""

    def __init__(self, prompt_width: int, row_limits: list[int]) -> None:
        self.prompt_width = prompt_width
        self.limits = torch.tensor(row_limits)

    def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
        return (input_ids.shape[1] - self.prompt_width) >= self.limits.to(input_ids.device)


class FirstToken(StoppingCriteria):  # type: ignore[misc]
    """A stopping criterion that never stops: transformers calls it after each new token."""

    def __init__(self, callback: Callable[[], None]) -> None:
        self.callback = callback

    def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
        self.callback()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class Cancelled(StoppingCriteria):  # type: ignore[misc]
    """A row whose request was cancelled (its client hung up) stops at this token; the others go on."""

    def __init__(self, row_cancels: Sequence[Cancellation | None]) -> None:
        self.rows = list(row_cancels)
        self.stopped = [False] * len(self.rows)  # a cancellation is never undone: look no more

    def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
        for row, cancel in enumerate(self.rows):
            if cancel is not None and not self.stopped[row]:
                self.stopped[row] = cancel.cancelled
        return torch.tensor(self.stopped, dtype=torch.bool, device=input_ids.device)


# Tokens of left context decoded before a row's tail, so the tail's first characters decode as in the
# whole text (a leading space, a character whose bytes began earlier).
STOP_CONTEXT_TOKENS = 4
# A trailing slack of characters on top of the longest stop string: what one new token can change.
STOP_SLACK_CHARS = 8


class StopStrings(StoppingCriteria):  # type: ignore[misc]
    """Each row stops once its decoded text holds a stop string: the same test on the same text as the cut
    of the answer (`first_stop`), so generation ends exactly where the answer is cut.

    Text, not token bytes (transformers' `stop_strings` match bytes, so a "\ufffd" stop never matched:
    that character stands for bytes that are not its own encoding), and no table over the vocabulary
    (transformers builds one per set of stop strings: seconds for long ones). A stop string can only
    appear at the end of the text, so each step decodes only the tail that could hold a new one. A
    trailing "\ufffd" is not yet text (a character whose next bytes are still to come) and is left for
    the next step.
    """

    def __init__(
        self, text_of: Callable[[list[int], list[int]], str], stops: tuple[str, ...], prompt_width: int
    ) -> None:
        self.text_of = text_of  # (context ids, new ids) -> the new ids' text, decoded after the context
        self.stops = stops
        self.prompt_width = prompt_width
        self.tail_chars = max(len(stop) for stop in stops) + STOP_SLACK_CHARS
        self.tail_tokens = 4 * self.tail_chars  # a character is at most 4 bytes; a token at least one
        self.done: list[bool] | None = None

    def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
        rows, length = input_ids.shape
        done = self.done = self.done or [False] * rows
        start = max(self.prompt_width, length - self.tail_tokens)
        context_start = max(0, start - STOP_CONTEXT_TOKENS)
        for row in range(rows):
            if done[row]:
                continue
            ids = input_ids[row, context_start:].tolist()
            text = self.text_of(ids[: start - context_start], ids[start - context_start :])
            done[row] = first_stop(text.rstrip("\ufffd")[-self.tail_chars :], self.stops) is not None
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)
