"""Helpers shared by the S3 tests: upload a model directory, count and inject requests, read a cache."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from function.weights.fetcher import COMPLETE_MARKER
from function.weights.integrity import MANIFEST_NAME, build_manifest


def upload_model(
    client: Any,
    bucket: str,
    prefix: str,
    model_dir: Path,
    *,
    manifest: bool = True,
    checksum: str | None = None,
) -> None:
    """Put every file of `model_dir` under `prefix`, and the publish manifest when asked."""
    extra = {"ChecksumAlgorithm": checksum} if checksum else {}
    for path in sorted(model_dir.iterdir()):
        if path.is_file():
            client.put_object(Bucket=bucket, Key=f"{prefix}{path.name}", Body=path.read_bytes(), **extra)
    if manifest:
        client.put_object(
            Bucket=bucket, Key=f"{prefix}{MANIFEST_NAME}", Body=json.dumps(build_manifest(model_dir)).encode()
        )


def files_of(directory: Path) -> dict[str, bytes]:
    """The files of a model directory by name, without the fetcher's completion marker."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and p.name != COMPLETE_MARKER}


class RequestCounter:
    """Counts S3 operations as botocore sends them (observes; changes nothing)."""

    def __init__(self, client: Any) -> None:
        self.calls: Counter[str] = Counter()
        self.ranged = 0
        client.meta.events.register("before-call.s3", self._count)

    def _count(self, model: Any, params: dict[str, Any], **_: Any) -> None:
        self.calls[model.name] += 1
        if model.name == "GetObject" and "Range" in params.get("headers", {}):
            self.ranged += 1


def inject_errors(client: Any, operation: str, status: int, code: str, times: int) -> list[int]:
    """Answer the first `times` requests of `operation` with an S3 error, before they leave."""
    from botocore.awsrequest import AWSResponse

    sent: list[int] = []

    class _Raw:
        def stream(self, **_: Any) -> Any:
            yield b""

    def respond(request: Any, **_: Any) -> Any:
        sent.append(1)
        if len(sent) > times:
            return None
        body = (
            f"<?xml version='1.0' encoding='UTF-8'?><Error><Code>{code}</Code>"
            f"<Message>injected</Message></Error>"
        ).encode()
        response = AWSResponse(request.url, status, {"Content-Type": "application/xml"}, _Raw())
        response._content = body
        return response

    client.meta.events.register(f"before-send.s3.{operation}", respond)
    return sent
