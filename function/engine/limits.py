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
    validate_stop_strings(params.stop, settings)


def validate_stop_strings(stops: tuple[str, ...], settings: Settings) -> None:
    """Each stop string, and all of them together, within their character caps: every generated token is
    checked against them, so their size is work on every step."""
    cap = settings.max_stop_string_chars
    for index, stop in enumerate(stops):
        if len(stop) > cap:
            raise InvalidRequestError(
                f"each stop string must be at most {cap} characters; stop[{index}] has {len(stop)}",
                field="stop",
                limit=cap,
            )
    total, total_cap = sum(map(len, stops)), settings.max_stop_total_chars
    if total > total_cap:
        raise InvalidRequestError(
            f"the stop strings must total at most {total_cap} characters; they have {total}",
            field="stop",
            limit=total_cap,
        )


def validate_stop_tokens(loaded: LoadedModel, stops: tuple[str, ...], settings: Settings) -> None:
    """Each stop string within its cap in tokens of the served model's tokenizer (checked once the model is
    known, after the character caps have bounded the tokenizing)."""
    cap = settings.max_stop_string_tokens
    for index, stop in enumerate(stops):
        tokens = len(loaded.tokenizer(stop, add_special_tokens=False)["input_ids"])
        if tokens > cap:
            raise InvalidRequestError(
                f"each stop string must be at most {cap} tokens of the served model's tokenizer; "
                f"stop[{index}] has {tokens}",
                field="stop",
                limit=cap,
            )


def validate_messages(messages: list[dict[str, str]], settings: Settings) -> None:
    """The number of messages of a chat request: each one is rendered through the chat template."""
    if len(messages) > settings.max_messages:
        raise InvalidRequestError(
            f"a chat request may have at most {settings.max_messages} messages; this one has {len(messages)}",
            field="messages",
            limit=settings.max_messages,
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
