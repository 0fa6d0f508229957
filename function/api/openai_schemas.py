"""OpenAI-compatible request and response shapes (the subset this server implements)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from function.api.schemas import (
    Bool,
    Float,
    Int,
    PositiveInt,
    Seed,
    StopString,
    StopStrings,
    Text,
    valid_unicode,
)
from function.engine.types import GREEDY_TEMPERATURE, SamplingParams
from function.errors import InvalidRequestError

OpenAIFinish = Literal["stop", "length"]
MAX_MODEL_NAME_CHARS = 256
# A static ceiling on a body's messages (MAX_MESSAGES, checked by the engine, is the configured one):
# a 1 MiB body could otherwise carry a hundred thousand tiny messages into validation.
MAX_MESSAGES_HARD_CAP = 4096
ModelName = Annotated[str, Field(max_length=MAX_MODEL_NAME_CHARS), BeforeValidator(valid_unicode)]


def _stops(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


class StreamOptions(BaseModel):
    """OpenAI's `stream_options`: with `include_usage`, a last chunk carries the request's usage."""

    include_usage: Bool = Field(
        default=False, description="Send a final chunk with `usage` (and empty `choices`) before [DONE]."
    )


class _Sampling(BaseModel):
    """Fields both endpoints share; unknown OpenAI fields (logprobs, user, …) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: ModelName | None = Field(
        default=None,
        description="A LoRA adapter's name (see /v1/models) selects it; the base model's name, or any "
        "other, selects the base.",
    )
    max_tokens: PositiveInt | None = Field(default=None, description="Default: min(256, MAX_NEW_TOKENS).")
    max_completion_tokens: PositiveInt | None = None
    temperature: Float = Field(default=1.0, ge=0, le=2)
    top_p: Float = Field(default=1.0, gt=0, le=1)
    n: Int = Field(default=1, ge=1)
    stop: StopString | StopStrings | None = None
    seed: Seed | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = Field(default=None, description="With stream: true.")

    def sampling_params(self, max_new_tokens_limit: int) -> SamplingParams:
        for name in ("max_tokens", "max_completion_tokens"):
            value = getattr(self, name)
            if value is not None and value > max_new_tokens_limit:
                raise InvalidRequestError(
                    f"{name} must be at most {max_new_tokens_limit}", field=name, limit=max_new_tokens_limit
                )
        requested = self.max_completion_tokens or self.max_tokens
        return SamplingParams(
            max_new_tokens=requested if requested is not None else min(256, max_new_tokens_limit),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=0,
            repetition_penalty=1.0,
            do_sample=self.temperature >= GREEDY_TEMPERATURE,
            num_return_sequences=self.n,
            stop=_stops(self.stop),
            seed=self.seed,
        )


class CompletionRequest(_Sampling):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "final_model",
                    "prompt": "What is the capital of France?",
                    "max_tokens": 64,
                    "temperature": 0.7,
                }
            ]
        }
    )

    prompt: Text = Field(min_length=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(_Sampling):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "model": "final_model",
                    "messages": [
                        {"role": "system", "content": "You are a helpful assistant."},
                        {"role": "user", "content": "What is the capital of France?"},
                    ],
                    "max_tokens": 64,
                    "temperature": 0.7,
                }
            ]
        }
    )

    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES_HARD_CAP)


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body, used by every /v1/… route."""

    error: OpenAIErrorInfo


OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse} for code in (400, 401, 403, 409, 413, 415, 422, 429, 431, 500, 503)
}


def openai_finish(reason: str) -> OpenAIFinish:
    """Our `time` (the time budget ran out) is a truncation, which OpenAI calls `length`."""
    return "stop" if reason == "stop" else "length"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
