"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions.

The same engine and validation as the guide's routes; errors use OpenAI's error shape here.
`stream: true` answers with server-sent events in server mode; through Lambda (Mangum buffers
responses) it is a clear 400. Streamed or not, a request is admitted, cancelled when its client hangs
up, and gives its place back when it ends (see `routes.run_admitted`).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import anyio
from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from function.api.dependencies import EngineDep, user_access
from function.api.observability import record_generation
from function.api.openai_schemas import (
    OPENAI_ERROR_RESPONSES,
    ChatCompletionRequest,
    CompletionRequest,
    openai_finish,
    usage,
)
from function.api.routes import generation_threads, run_admitted
from function.api.sse import openai_sse
from function.engine.engine import Engine
from function.engine.streaming import TextStream
from function.engine.types import Cancellation, Completion, SamplingParams, StreamEnd
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
async def completions(body: CompletionRequest, request: Request, engine: EngineDep) -> Any:
    params = sampling_params(body, engine)
    if body.stream:
        _refuse_stream_on_lambda(request)
        return await stream(request, engine, body, body.prompt, params, "text_completion", chat=False)
    result = await run_admitted(request, engine, lambda cancel: engine.generate(body.prompt, params, cancel))
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
async def chat_completions(body: ChatCompletionRequest, request: Request, engine: EngineDep) -> Any:
    params = sampling_params(body, engine)
    messages = [message.model_dump() for message in body.messages]
    if body.stream:
        _refuse_stream_on_lambda(request)
        return await stream(request, engine, body, messages, params, "chat.completion.chunk", chat=True)
    result = await run_admitted(
        request, engine, lambda cancel: engine.chat_messages(messages, params, cancel)
    )
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


def include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    """OpenAI's `stream_options.include_usage`, typed or (where the schema lacks it) an extra field."""
    options = getattr(body, "stream_options", None)
    if isinstance(options, dict):
        return options.get("include_usage") is True
    return getattr(options, "include_usage", False) is True


async def stream(
    request: Request,
    engine: Engine,
    body: CompletionRequest | ChatCompletionRequest,
    prompt: str | list[dict[str, str]],
    params: SamplingParams,
    kind: str,
    *,
    chat: bool,
) -> StreamingResponse:
    """An admitted stream of n choices. The first choice's checks (limits, context) run before the
    response starts, so a bad request gets a clean error; the place is held to the stream's last chunk,
    and a client that hangs up cancels the generation."""
    admission = engine.admit()
    cancel = Cancellation()
    threads = generation_threads(request, engine)
    single = replace(params, num_return_sequences=1)
    try:
        first = await anyio.to_thread.run_sync(engine.stream, prompt, single, cancel, limiter=threads)
    except BaseException:
        admission.release()
        raise

    def recorded(summary: Completion) -> None:
        record_generation(request, summary)

    def closed() -> None:
        cancel.cancel()  # a no-op for a stream that ended: its generation is over
        admission.release()

    return openai_sse(
        _choices(engine, first, prompt, params, cancel),
        kind,
        chat=chat,
        model=params.adapter or first.model_name,
        include_usage=include_usage(body),
        on_end=recorded,
        on_close=closed,
        threads=threads,
    )


def _choices(
    engine: Engine,
    first: TextStream,
    prompt: str | list[dict[str, str]],
    params: SamplingParams,
    cancel: Cancellation,
) -> Iterator[tuple[int, str | StreamEnd]]:
    """n streamed choices, one after another (choice i uses seed + i, so each is reproducible); `first`
    is choice 0, created (and checked) before the response starts."""
    single = replace(params, num_return_sequences=1)
    for index in range(params.num_return_sequences):
        if cancel.cancelled:
            return
        seed = None if params.seed is None else params.seed + index
        choice = first if index == 0 else engine.stream(prompt, replace(single, seed=seed), cancel)
        for event in choice:
            yield index, event
