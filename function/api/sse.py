"""Server-sent events in OpenAI's chunk format, for `stream: true` on the /v1 routes.

The engine's stream is synchronous (a generation thread feeds it): each next item is taken in a worker
thread, and the response runs `on_close` once it is over, whether sent in full, failed, or cut short
by a client that hung up (Starlette then stops the body without closing it), so the route can cancel
the generation and give back the request's place.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import anyio
from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from function.api.openai_schemas import openai_finish, usage
from function.engine.types import Completion, FinishReason, StreamEnd

_DONE = object()


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that calls `on_close` once, when it is over, however it ended."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], media_type: str) -> None:
        super().__init__(content, media_type=media_type)
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def in_threads(items: Iterator[Any], threads: anyio.CapacityLimiter | None) -> AsyncIterator[Any]:
    """A blocking iterator's items, each taken in a worker thread. Cancelled (the client hung up), the
    wait ends at once; the thread finishes its item alone (the route's `on_close` cancels the generation,
    so that is at most a token away)."""
    while True:
        item = await anyio.to_thread.run_sync(next, items, _DONE, abandon_on_cancel=True, limiter=threads)
        if item is _DONE:
            return
        yield item


def openai_sse(
    events: Iterator[tuple[int, str | StreamEnd]],
    kind: str,
    *,
    chat: bool,
    model: str,
    include_usage: bool = False,
    on_end: Callable[[Completion], None] | None = None,
    on_close: Callable[[], None] | None = None,
    threads: anyio.CapacityLimiter | None = None,
) -> StreamingResponse:
    """OpenAI's chunk format as server-sent events, ending with `data: [DONE]`.

    Every chunk names `model`. With `include_usage` (OpenAI's `stream_options.include_usage`), every chunk
    carries `"usage": null` and a last chunk before [DONE] carries the usage, with no choices. `on_end`
    gets the stream's figures once every choice has ended (for the request's log line and metrics).
    """
    ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

    def frame(choices: list[dict[str, Any]], **extra: Any) -> str:
        payload = {"id": ident, "object": kind, "created": created, "model": model, "choices": choices}
        if include_usage:
            payload["usage"] = None
        payload.update(extra)
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def chunk(index: int, delta: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            content: dict[str, Any] = (
                {"role": "assistant", "content": ""}
                if first
                else ({} if delta is None else {"content": delta})
            )
            choice: dict[str, Any] = {
                "index": index,
                "delta": content,
                "finish_reason": finish,
                "logprobs": None,
            }
        else:
            choice = {"index": index, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return frame([choice])

    async def body() -> AsyncIterator[str]:
        started: set[int] = set()
        texts: dict[int, str] = {}
        ends: list[StreamEnd] = []
        async for index, event in in_threads(events, threads):
            if chat and index not in started:
                started.add(index)
                yield chunk(index, None, None, first=True)
            if isinstance(event, StreamEnd):
                ends.append(event)
                yield chunk(index, None, openai_finish(event.finish_reason))
            else:
                texts[index] = texts.get(index, "") + event
                yield chunk(index, event, None)
        if ends:
            summary = stream_summary(ends, [texts.get(index, "") for index in range(len(ends))])
            if on_end is not None:
                on_end(summary)
            if include_usage:
                yield frame([], usage=usage(summary.prompt_tokens, summary.completion_tokens))
        yield "data: [DONE]\n\n"

    return ClosingStreamingResponse(body(), on_close or (lambda: None), media_type="text/event-stream")


def stream_summary(ends: list[StreamEnd], texts: list[str]) -> Completion:
    """A finished stream as the Completion its non-streamed request would have returned: the prompt's tokens
    once, the completion tokens and generation seconds of all its choices."""
    reasons: list[FinishReason] = [end.finish_reason for end in ends]
    return Completion(
        prompt="",
        continuations=texts,
        finish_reasons=reasons,
        prompt_tokens=ends[0].prompt_tokens,
        completion_tokens=sum(end.completion_tokens for end in ends),
        generation_time=round(sum(end.generation_time for end in ends), 4),
        model_name=ends[0].model_name,
    )
