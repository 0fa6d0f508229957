"""Server-sent events in OpenAI's chunk format, for `stream: true` on the /v1 routes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from typing import Any

from fastapi.responses import StreamingResponse

from function.api.openai_schemas import openai_finish
from function.engine.types import StreamEnd


def openai_sse(events: Iterator[tuple[int, str | StreamEnd]], kind: str, *, chat: bool) -> StreamingResponse:
    """OpenAI's chunk format as server-sent events, ending with `data: [DONE]`."""
    ident, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())

    def chunk(index: int, model: str, delta: str | None, finish: str | None, first: bool = False) -> str:
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
        payload = {"id": ident, "object": kind, "created": created, "model": model, "choices": [choice]}
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def body() -> Iterator[str]:
        started: set[int] = set()
        for index, event in events:
            if chat and index not in started:
                started.add(index)
                yield chunk(index, "", None, None, first=True)
            if isinstance(event, StreamEnd):
                yield chunk(index, event.model_name, None, openai_finish(event.finish_reason))
            else:
                yield chunk(index, "", event, None)
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream")
