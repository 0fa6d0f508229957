"""Bounds a request meets before it costs anything: the server's limits, the prompt cap, the context."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from function.config import Settings
from function.engine.types import SamplingParams
from function.errors import ContextLengthExceededError, InvalidRequestError, PayloadTooLargeError

if TYPE_CHECKING:
    from function.weights.loading import LoadedModel


def validate_limits(params: SamplingParams, settings: Settings) -> None:
    """Bounds that depend on the server's settings, and combinations the schema can't see."""
    if params.max_new_tokens > settings.max_new_tokens:
        raise InvalidRequestError(
            f"max_new_tokens must be at most {settings.max_new_tokens}",
            field="max_new_tokens",
            limit=settings.max_new_tokens,
        )
    if params.num_return_sequences > settings.max_num_return_sequences:
        raise InvalidRequestError(
            f"num_return_sequences must be at most {settings.max_num_return_sequences}",
            field="num_return_sequences",
            limit=settings.max_num_return_sequences,
        )


def encode_prompt(
    loaded: LoadedModel, prompt: str, params: SamplingParams, settings: Settings, *, add_special_tokens: bool
) -> tuple[Any, int]:
    """Tokenize the prompt and check it against the prompt cap and the model's context.
    Returns the encoding and the prompt's token count."""
    encoded = loaded.tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)
    prompt_tokens = int(encoded["input_ids"].shape[1])
    cap = settings.max_prompt_tokens
    if cap is not None and prompt_tokens > cap:
        raise PayloadTooLargeError(
            f"the prompt has {prompt_tokens} tokens; the limit is {cap}", field="prompt", limit=cap
        )
    total = prompt_tokens + params.max_new_tokens
    if total > loaded.context_length:
        raise ContextLengthExceededError(
            f"the prompt has {prompt_tokens} tokens and max_new_tokens is {params.max_new_tokens}: "
            f"{total} exceeds the model's context length of {loaded.context_length}",
            field="max_new_tokens",
            limit=loaded.context_length,
        )
    return encoded, prompt_tokens
