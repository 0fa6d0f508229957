"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

The same engine and validation as the guide's routes; errors use OpenAI's error shape here.
`stream: true` answers with server-sent events in server mode; through Lambda (Mangum buffers
responses) it is a clear 400.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Depends, Request

from function.api.dependencies import EngineDep, user_access
from function.api.observability import record_generation
from function.api.openai_schemas import (
    OPENAI_ERROR_RESPONSES,
    ChatCompletionRequest,
    CompletionRequest,
    openai_finish,
    usage,
)
from function.api.sse import openai_sse
from function.engine.engine import Engine
from function.engine.types import SamplingParams, StreamEnd
from function.errors import StreamingUnavailableError

STREAMABLE: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "JSON; with stream: true, server-sent events in OpenAI's chunk format, then [DONE]",
        "content": {"application/json": {}, "text/event-stream": {}},
    }
}


router = APIRouter(
    prefix="/v1",
    dependencies=[Depends(user_access)],
    tags=["OpenAI-compatible"],
    responses=OPENAI_ERROR_RESPONSES,
)


@router.get("/models")
def list_models(engine: EngineDep) -> dict[str, Any]:
    """The base model, then each adapter a request may name in `model`."""
    loaded = engine.require_model()
    created = int(loaded.loaded_at.timestamp())
    return {
        "object": "list",
        "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "llm-function"}
            for name in (loaded.name, *loaded.adapters)
        ],
    }


@router.post("/completions", response_model=None, responses=STREAMABLE)
def completions(body: CompletionRequest, request: Request, engine: EngineDep) -> Any:
    params = replace(
        body.sampling_params(engine.settings.max_new_tokens), adapter=engine.adapter_named(body.model)
    )
    if body.stream:
        _refuse_stream_on_lambda(request)
        return openai_sse(_choices(engine, body.prompt, params), "text_completion", chat=False)
    result = engine.generate(body.prompt, params)
    record_generation(request, result)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": result.model_name,
        "choices": [
            {"index": i, "text": text, "finish_reason": openai_finish(reason), "logprobs": None}
            for i, (text, reason) in enumerate(zip(result.continuations, result.finish_reasons, strict=True))
        ],
        "usage": usage(result.prompt_tokens, result.completion_tokens),
    }


@router.post("/chat/completions", response_model=None, responses=STREAMABLE)
def chat_completions(body: ChatCompletionRequest, request: Request, engine: EngineDep) -> Any:
    params = replace(
        body.sampling_params(engine.settings.max_new_tokens), adapter=engine.adapter_named(body.model)
    )
    messages = [message.model_dump() for message in body.messages]
    if body.stream:
        _refuse_stream_on_lambda(request)
        return openai_sse(_choices(engine, messages, params), "chat.completion.chunk", chat=True)
    result = engine.chat_messages(messages, params)
    record_generation(request, result)
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": result.model_name,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text.strip()},
                "finish_reason": openai_finish(reason),
                "logprobs": None,
            }
            for i, (text, reason) in enumerate(zip(result.continuations, result.finish_reasons, strict=True))
        ],
        "usage": usage(result.prompt_tokens, result.completion_tokens),
    }


def sampling_params(body: CompletionRequest | ChatCompletionRequest, engine: Engine) -> SamplingParams:
    """The request's parameters, with the adapter its `model` names (the base for any other name)."""
    params = body.sampling_params(engine.settings.max_new_tokens)
    return replace(params, adapter=engine.adapter_named(body.model))


def _refuse_stream_on_lambda(request: Request) -> None:
    if "aws.event" in request.scope:
        raise StreamingUnavailableError(
            "stream: true needs the server mode: on AWS Lambda responses are buffered "
            "(Mangum), so send stream: false",
            field="stream",
        )


def _choices(
    engine: Engine, prompt: str | list[dict[str, str]], params: SamplingParams
) -> Iterator[tuple[int, str | StreamEnd]]:
    """n streamed choices, one after another (choice i uses seed + i, so each is reproducible).

    Not a generator itself: the first stream is created here, so a bad request (limits, context)
    fails with a clean error before the response starts.
    """
    single = replace(params, num_return_sequences=1)
    first = engine.stream(prompt, single)

    def events() -> Iterator[tuple[int, str | StreamEnd]]:
        for index in range(params.num_return_sequences):
            seed = None if params.seed is None else params.seed + index
            choice = first if index == 0 else engine.stream(prompt, replace(single, seed=seed))
            for event in choice:
                yield index, event

    return events()
