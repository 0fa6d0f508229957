"""OpenAI-compatible request and response shapes (the subset this server implements)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from function.api.schemas import Bool, Float, Int, PositiveInt, Seed, StopStrings
from function.engine.types import GREEDY_TEMPERATURE, SamplingParams
from function.errors import InvalidRequestError

OpenAIFinish = Literal["stop", "length"]


def _stops(value: str | list[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


class _Sampling(BaseModel):
    """Fields both endpoints share; unknown OpenAI fields (logprobs, user, …) are accepted and ignored."""

    model_config = ConfigDict(extra="allow")

    model: str | None = Field(
        default=None,
        description="A LoRA adapter's name (see /v1/models) selects it; the base model's name, or any "
        "other, selects the base.",
    )
    max_tokens: PositiveInt | None = Field(default=None, description="Default: min(256, MAX_NEW_TOKENS).")
    max_completion_tokens: PositiveInt | None = None
    temperature: Float = Field(default=1.0, ge=0, le=2)
    top_p: Float = Field(default=1.0, gt=0, le=1)
    n: Int = Field(default=1, ge=1)
    stop: Annotated[str, Field(min_length=1)] | StopStrings | None = None
    seed: Seed | None = None
    stream: Bool = False

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

    prompt: str = Field(min_length=1)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


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

    messages: list[ChatMessage] = Field(min_length=1)


class OpenAIErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: str


class OpenAIErrorResponse(BaseModel):
    """OpenAI's error body, used by every /v1/… route."""

    error: OpenAIErrorInfo


OPENAI_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": OpenAIErrorResponse} for code in (400, 401, 403, 409, 413, 422, 429, 500, 503)
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
