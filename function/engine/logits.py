"""Logits processors and stopping criteria that `run_batch` hands to transformers' `generate`.

Importing this module imports torch and transformers: `function.engine.generation` imports it
when it first generates, so the engine's other modules stay light.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from transformers import LogitsProcessor, StoppingCriteria

LOGIT_BOUND = 1e4  # far beyond any real model's logits; keeps extreme penalties finite


class BoundedLogits(LogitsProcessor):  # type: ignore[misc]
    """After the repetition penalty, before temperature: logits stay finite (a penalty of 1e-300 is valid)."""

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        return torch.nan_to_num(scores, nan=-LOGIT_BOUND).clamp(-LOGIT_BOUND, LOGIT_BOUND)


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
