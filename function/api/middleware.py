"""ASGI middleware: the request header and body caps, and the cold-start mark on the first response."""

from __future__ import annotations

import itertools
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from function.api.errors import error_response, route_path
from function.api.schemas import ErrorDetail


class HeaderSizeLimit:
    """431 when the request's header names and values total more than `max_bytes`.

    `python -m function serve` also has uvicorn refuse a header block that grows past the cap before it
    is complete (nothing reaches the app then); this check covers every other way in: `uvicorn
    function.app:app`, a head that arrived whole, and Lambda events.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            total = sum(len(name) + len(value) for name, value in scope.get("headers") or [])
            if total > self.max_bytes:
                await headers_too_large(self.max_bytes, route_path(scope), total)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def headers_too_large(max_bytes: int, path: str, total: int | None = None) -> JSONResponse:
    """The 431 of both header checks (this middleware's and the server's, see `function.__main__`)."""
    size = f" ({total} bytes)" if total is not None else ""
    detail = ErrorDetail(field="headers", message="request headers too large", limit=max_bytes)
    message = f"the request headers{size} are over the limit of {max_bytes} bytes"
    return error_response(431, "headers_too_large", message, [detail], path=path)


class BodySizeLimit:
    """413 for bodies over `max_bytes`: by Content-Length up front, or counted while streaming in."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(scope, receive, send)
            return
        # Read the body up to the cap before the app sees it (FastAPI turns errors raised while it reads
        # the body into 400s), then replay it. At most max_bytes are ever buffered.
        messages: list[Message] = []
        received = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            received += len(message.get("body", b""))
            if received > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            if not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        detail = ErrorDetail(field="body", message="request body too large", limit=self.max_bytes)
        response = error_response(
            413,
            "payload_too_large",
            f"the request body is over the limit of {self.max_bytes} bytes",
            [detail],
            path=route_path(scope),
        )
        await response(scope, receive, send)


def mark_cold_response(app: FastAPI) -> None:
    """`X-Cold-Start: true` on the first response of this process (environment), `false` after."""
    responses = itertools.count()

    @app.middleware("http")
    async def cold_start_header(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["X-Cold-Start"] = "true" if next(responses) == 0 else "false"
        return response
