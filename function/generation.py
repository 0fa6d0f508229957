"""One call of transformers' `generate`, and turning its token ids into texts and finish reasons."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from function.engine import FinishReason, SamplingParams
    from function.loading import LoadedModel


def generation_config(loaded: LoadedModel, params: SamplingParams) -> Any:
    """A complete GenerationConfig: nothing is inherited from the checkpoint's defaults by accident."""
    from transformers import GenerationConfig

    tokenizer = loaded.tokenizer
    options: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens,
        # Greedy sequences would be identical: generate one and copy it (see run_generation).
        "num_return_sequences": 1 if params.greedy else params.num_return_sequences,
        "repetition_penalty": params.repetition_penalty,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": sorted(eos_token_ids(loaded)) or None,
        "bos_token_id": tokenizer.bos_token_id,
        "do_sample": not params.greedy,
    }
    if not params.greedy:
        options.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    if params.stop:
        options["stop_strings"] = list(params.stop)
    if params.max_time is not None:
        options["max_time"] = params.max_time
    return GenerationConfig(**options)


def run_generation(
    loaded: LoadedModel,
    encoded: Any,
    params: SamplingParams,
    on_first_token: Callable[[], None] | None = None,
    streamer: Any = None,
) -> tuple[list[str], list[FinishReason], int]:
    """Generate; return continuations (stop strings cut off), finish reasons and tokens produced.

    `on_first_token` is called once, right after the first new token exists (cold-start timing).
    """
    import torch

    if not params.greedy:
        if params.seed is not None:
            torch.manual_seed(params.seed)
        else:
            torch.seed()  # an earlier seeded request must not make this one predictable
    inputs = {name: tensor.to(loaded.device) for name, tensor in encoded.items()}
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes warns about input casts on every call
        extra: dict[str, Any] = {"logits_processor": _bounded_logits()}
        if on_first_token is not None:
            extra["stopping_criteria"] = _first_token_criteria(on_first_token)
        if streamer is not None:
            extra["streamer"] = streamer
        output = loaded.model.generate(
            **inputs, generation_config=generation_config(loaded, params), tokenizer=loaded.tokenizer, **extra
        )
    prompt_ids = encoded["input_ids"][0].tolist()
    prompt_len = len(prompt_ids)
    continuations: list[str] = []
    reasons: list[FinishReason] = []
    produced = 0
    eos_ids = eos_token_ids(loaded)
    for row in output.tolist():
        new_ids = row[prompt_len:]
        text, reason, count = _finish(loaded.tokenizer, eos_ids, prompt_ids, new_ids, params)
        continuations.append(text)
        reasons.append(reason)
        produced += count
    if params.greedy and params.num_return_sequences > 1:
        copies = params.num_return_sequences
        return continuations * copies, reasons * copies, produced * copies
    return continuations, reasons, produced


LOGIT_BOUND = 1e4  # far beyond any real model's logits; keeps extreme penalties finite


def _bounded_logits() -> Any:
    """After the repetition penalty, before temperature: logits stay finite (a penalty of 1e-300 is valid)."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class BoundedLogits(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            return torch.nan_to_num(scores, nan=-LOGIT_BOUND).clamp(-LOGIT_BOUND, LOGIT_BOUND)

    return LogitsProcessorList([BoundedLogits()])


def _first_token_criteria(callback: Callable[[], None]) -> Any:
    """A stopping criterion that never stops: transformers calls it after each new token."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class FirstToken(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **_: Any) -> Any:
            callback()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([FirstToken()])


def _finish(
    tokenizer: Any, eos_ids: set[int], prompt_ids: list[int], new_ids: list[int], params: SamplingParams
) -> tuple[str, FinishReason, int]:
    pad_id = tokenizer.pad_token_id
    content: list[int] = []
    hit_eos = False
    for token in new_ids:
        if token in eos_ids:
            hit_eos = True
            break
        content.append(token)
    produced = len(content) + (1 if hit_eos else 0)
    if not hit_eos and pad_id is not None:
        # Rows that stopped early (a stop string in another row) are padded to the longest.
        while content and content[-1] == pad_id and pad_id not in eos_ids:
            content.pop()
        produced = len(content)
    text = decode_continuation(tokenizer, prompt_ids, content)
    cut = _first_stop(text, params.stop)
    if cut is not None:
        return text[:cut], "stop", produced
    if hit_eos:
        return text, "stop", produced
    if produced >= params.max_new_tokens or params.max_time is None:
        return text, "length", produced
    return text, "time", produced


def decode_continuation(tokenizer: Any, prompt_ids: list[int], new_ids: list[int]) -> str:
    """Decode the new tokens in the prompt's context, so spaces and multi-byte characters join right."""
    prefix = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    full = tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)
    if full.startswith(prefix):
        return str(full[len(prefix) :])
    return str(tokenizer.decode(new_ids, skip_special_tokens=True))


def _first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    positions = [index for stop in stops if (index := text.find(stop)) >= 0]
    return min(positions) if positions else None


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    """End-of-sequence ids: the checkpoint's generation config (it may list several), else the tokenizer's."""
    eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list) else {int(eos)}
