"""Direct invocations (`aws lambda invoke`, `sam local invoke -e`) as a Mangum custom handler.

The documented payload `{"path": "/generate", "method": "POST", "body": {...}, "headers": {...},
"query": {...}}` goes through the same app (same validation) as an HTTP event, and is answered
with `{"statusCode": 200, "headers": {...}, "body": {...}}`: the body as JSON, not a string.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

from mangum.types import LambdaConfig, LambdaContext, LambdaEvent, Response, Scope

from function.errors import UnsupportedEventError

FIELD_TYPES: tuple[tuple[str, type, str], ...] = (
    ("method", str, "string"),
    ("headers", dict, "object"),
    ("query", dict, "object"),
)


def is_direct_payload(event: Any) -> bool:
    return isinstance(event, dict) and "requestContext" not in event and isinstance(event.get("path"), str)


def check_direct_payload(event: dict[str, Any]) -> None:
    """A field of the wrong JSON type is the caller's mistake: name it (a 400), before the app runs."""
    for name, kind, label in FIELD_TYPES:
        if event.get(name) is not None and not isinstance(event[name], kind):
            raise UnsupportedEventError(f"direct payload: {name} must be a JSON {label}", field=name)


class DirectPayload:
    """Mangum's extension point for event shapes it does not know (`custom_handlers=[DirectPayload]`)."""

    @classmethod
    def infer(cls, event: LambdaEvent, context: LambdaContext, config: LambdaConfig) -> bool:
        return is_direct_payload(event)

    def __init__(self, event: LambdaEvent, context: LambdaContext, config: LambdaConfig) -> None:
        self.event = event
        self.context = context
        self.config = config
        self.headers = {str(k).lower(): str(v) for k, v in (event.get("headers") or {}).items()}
        body = event.get("body")
        if body is not None and not isinstance(body, str):
            body = json.dumps(body)
        if body is not None:
            self.headers.setdefault("content-type", "application/json")  # the payload's body is JSON
        self._body = body

    @property
    def body(self) -> bytes:
        return b"" if self._body is None else self._body.encode("utf-8")

    @property
    def scope(self) -> Scope:
        path = "/" + str(self.event["path"]).lstrip("/")
        method = str(self.event.get("method") or self.event.get("httpMethod") or "GET").upper()
        query = self.event.get("query") or self.event.get("queryStringParameters") or {}
        headers = {"host": "lambda.direct", "user-agent": "direct-invoke", **self.headers}
        return {
            "type": "http",
            "method": method,
            "http_version": "1.1",
            "headers": [[key.encode(), value.encode()] for key, value in headers.items()],
            "path": path,
            "raw_path": None,
            "root_path": "",
            "scheme": "https",
            "query_string": urlencode(query, doseq=True).encode(),
            "server": ("lambda.direct", 443),
            "client": ("127.0.0.1", 0),
            "asgi": {"version": "3.0", "spec_version": "2.0"},
            "aws.event": self.event,
            "aws.context": self.context,
        }

    def __call__(self, response: Response) -> dict[str, Any]:
        text = response["body"].decode("utf-8", errors="replace")
        try:
            body: Any = json.loads(text) if text else None
        except ValueError:
            body = text
        headers = {key.decode().lower(): value.decode() for key, value in response["headers"]}
        return {"statusCode": response["status"], "headers": headers, "body": body}
