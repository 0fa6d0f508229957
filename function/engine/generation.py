"""One call of transformers' `generate`, and turning its token ids into texts and finish reasons."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from function.engine.streaming import first_stop
from function.engine.types import Cancellation, FinishReason, RowResult, SamplingParams
from function.weights.adapters import BASE_ADAPTER_NAME

if TYPE_CHECKING:
    from function.weights.loading import LoadedModel


def generation_config(
    loaded: LoadedModel, params: SamplingParams, max_new_tokens: int | None = None, *, compiled: bool = False
) -> Any:
    """A complete GenerationConfig: nothing is inherited from the checkpoint's defaults by accident.

    The repetition penalty and the stop strings are not in it: `PaddingAwareRepetitionPenalty` and
    `StopStrings` apply them (see run_batch).
    `compiled`: a static KV cache, which transformers decodes with a torch.compile'd forward.
    """
    from transformers import GenerationConfig

    tokenizer = loaded.tokenizer
    options: dict[str, Any] = {
        "max_new_tokens": params.max_new_tokens if max_new_tokens is None else max_new_tokens,
        # Greedy sequences would be identical: generate one and copy it (see run_batch).
        "num_return_sequences": 1 if params.greedy else params.num_return_sequences,
        "repetition_penalty": 1.0,
        "pad_token_id": pad_token_id(loaded),
        "eos_token_id": sorted(eos_token_ids(loaded)) or None,
        "bos_token_id": tokenizer.bos_token_id,
        "do_sample": not params.greedy,
    }
    if not params.greedy:
        options.update(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    if params.max_time is not None:
        options["max_time"] = params.max_time
    if compiled:
        from transformers.generation.configuration_utils import CompileConfig

        compile_config = CompileConfig()
        compile_config._compile_all_devices = True  # type: ignore[assignment]  # transformers compiles on CUDA only unless told
        options.update(cache_implementation="static", compile_config=compile_config)
    return GenerationConfig(**options)


def run_generation(
    loaded: LoadedModel,
    encoded: Any,
    params: SamplingParams,
    on_first_token: Callable[[], None] | None = None,
    streamer: Any = None,
    *,
    compiled: bool = False,
    cancel: Cancellation | None = None,
) -> RowResult:
    """Generate for one prompt: a batch of one, through the same code as a batch of many."""
    return run_batch(
        loaded, [(encoded, params)], on_first_token, streamer=streamer, compiled=compiled, cancels=[cancel]
    )[0]


def run_batch(
    loaded: LoadedModel,
    items: list[tuple[Any, SamplingParams]],
    on_first_token: Callable[[], None] | None = None,
    streamer: Any = None,
    *,
    compiled: bool = False,
    cancels: list[Cancellation | None] | None = None,
) -> list[RowResult]:
    """One `generate` call for several tokenized prompts that share their sampling parameters
    (all but `max_new_tokens`, which each row keeps as its own limit).

    Prompts are padded on the left and masked; the repetition penalty ignores each row's padding.
    `on_first_token` is called once, right after the first new token exists (cold-start timing).
    `cancels`, one per prompt: a prompt whose cancellation is set stops at its next token (its result
    holds what it had generated); the others go on.
    """
    import torch
    from transformers import LogitsProcessorList, StoppingCriteriaList

    from function.engine.logits import (
        BoundedLogits,
        Cancelled,
        FirstToken,
        PaddingAwareRepetitionPenalty,
        RowLimits,
        StopStrings,
    )

    group = items[0][1]
    if not group.greedy:
        if group.seed is not None:
            torch.manual_seed(group.seed)
        else:
            torch.seed()  # an earlier seeded request must not make this one predictable
    copies = 1 if group.greedy else group.num_return_sequences
    prompts = [encoded["input_ids"][0].tolist() for encoded, _ in items]
    width = max(len(ids) for ids in prompts)
    pad_id = pad_token_id(loaded)
    pads = [width - len(ids) for ids in prompts]
    input_ids = torch.tensor([[pad_id] * pad + ids for pad, ids in zip(pads, prompts, strict=True)])
    attention_mask = torch.tensor(
        [[0] * pad + [1] * len(ids) for pad, ids in zip(pads, prompts, strict=True)]
    )
    limits = [params.max_new_tokens for _, params in items]
    # The rows as generate lays them out: each prompt's `copies` samples next to each other.
    row_pads = [pad for pad in pads for _ in range(copies)]
    row_limits = [limit for limit in limits for _ in range(copies)]

    processors: list[Any] = []
    if group.repetition_penalty != 1.0:
        processors.append(PaddingAwareRepetitionPenalty(group.repetition_penalty, row_pads))
    if group.repetition_penalty != 1.0 or not group.greedy:
        # Extreme penalties (1e-300 is valid) or fp16 overflow must not reach sampling as inf or NaN.
        # (Plain greedy takes the argmax of the model's own logits: nothing to bound.)
        processors.append(BoundedLogits())
    criteria: list[Any] = []
    if len(set(limits)) > 1:
        criteria.append(RowLimits(width, row_limits))
    if group.stop:
        tokenizer = loaded.tokenizer
        criteria.append(
            StopStrings(lambda context, new: decode_continuation(tokenizer, context, new), group.stop, width)
        )
    if cancels is not None and any(cancel is not None for cancel in cancels):
        criteria.append(Cancelled([cancel for cancel in cancels for _ in range(copies)]))
    if on_first_token is not None:
        criteria.append(FirstToken(on_first_token))
    extra: dict[str, Any] = {}
    if criteria:
        extra["stopping_criteria"] = StoppingCriteriaList(criteria)
    if streamer is not None:
        extra["streamer"] = streamer
    if loaded.adapters:  # named adapters beside the base: each call says which one its rows use
        extra["adapter_names"] = [group.adapter or BASE_ADAPTER_NAME] * (len(items) * copies)
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bitsandbytes warns about input casts on every call
        config = generation_config(loaded, group, max_new_tokens=max(limits), compiled=compiled)
        if loaded.decoder is not None:
            from function.engine.decode_loop import decode

            output = decode(
                loaded.decoder,
                input_ids,
                attention_mask,
                config,
                LogitsProcessorList(processors),
                extra.get("stopping_criteria"),
                streamer,
            )
        else:
            output = loaded.model.generate(
                input_ids=input_ids.to(loaded.device),
                attention_mask=attention_mask.to(loaded.device),
                generation_config=config,
                tokenizer=loaded.tokenizer,
                logits_processor=LogitsProcessorList(processors),
                **extra,
            )
    rows = output.tolist()
    eos_ids = eos_token_ids(loaded)
    results: list[RowResult] = []
    for index, (prompt_ids, (_, params)) in enumerate(zip(prompts, items, strict=True)):
        continuations: list[str] = []
        reasons: list[FinishReason] = []
        produced = 0
        for row in rows[index * copies : (index + 1) * copies]:
            new_ids = row[width : width + params.max_new_tokens]
            text, reason, count = _finish(loaded.tokenizer, eos_ids, prompt_ids, new_ids, params)
            continuations.append(text)
            reasons.append(reason)
            produced += count
        if params.greedy and params.num_return_sequences > 1:
            n = params.num_return_sequences
            continuations, reasons, produced = continuations * n, reasons * n, produced * n
        results.append(RowResult(continuations, reasons, produced))
    return results


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
    if not hit_eos and pad_id is not None and pad_id not in eos_ids:
        # A row that finished before the others of its batch (a stop string) is filled with padding.
        while content and content[-1] == pad_id:
            content.pop()
    text = decode_continuation(tokenizer, prompt_ids, content)
    cut = first_stop(text, params.stop)
    if cut is not None:
        # A stop string ends a row at once: an end token after it can only be a finished row's filler.
        return text[:cut], "stop", len(content)
    if hit_eos:
        return text, "stop", len(content) + 1
    produced = len(content)
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


def pad_token_id(loaded: LoadedModel) -> int:
    """The id that fills finished rows and left-pads short prompts: the tokenizer's pad, else an end token."""
    pad = loaded.tokenizer.pad_token_id
    if pad is None:
        eos = sorted(eos_token_ids(loaded))
        pad = eos[0] if eos else 0
    return int(pad)


def eos_token_ids(loaded: LoadedModel) -> set[int]:
    """End-of-sequence ids: the checkpoint's generation config (it may list several), else the tokenizer's."""
    eos = getattr(getattr(loaded.model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        eos = loaded.tokenizer.eos_token_id
    if eos is None:
        return set()
    return {int(e) for e in eos} if isinstance(eos, list) else {int(eos)}
