"""Load the sample events in events/ (full, realistic payloads) for tests."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

EVENTS_DIR = Path(__file__).resolve().parents[2] / "events"


def load_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads((EVENTS_DIR / name).read_text(encoding="utf-8"))
    return event


def event_names() -> list[str]:
    return sorted(p.name for p in EVENTS_DIR.glob("*.json"))


def expected_status(name: str) -> int | None:
    """What each sample must answer: 200, or 422 for the `error` samples; None for warm-up pings."""
    if "warmup" in name:
        return None
    return 422 if "error" in name else 200


def http_body(response: dict[str, Any]) -> Any:
    """The body of an API Gateway / ALB style response: base64-decoded, JSON-parsed when it is JSON."""
    body = response.get("body") or ""
    if response.get("isBase64Encoded"):
        body = base64.b64decode(body).decode()
    return json.loads(body) if body.startswith(("{", "[")) else body


def assert_sample_answered(name: str, response: dict[str, Any]) -> None:
    """What every sample in events/ must get back, whether handled in process or in the emulator."""
    status = expected_status(name)
    if status is None:
        assert response == {"warmup": True, "model_loaded": True}
        return
    assert response["statusCode"] == status, response
    body = response["body"] if name.startswith("direct") else http_body(response)
    if status == 422:
        assert body["error"]["code"] == "invalid_request"
    elif "generate" in name:
        assert body["generated_text"][0].startswith("Python이란 무엇인가요?")
    elif "chat" in name:
        assert body["instruction"] == "머신러닝을 설명하세요"
    elif "health" in name:
        assert body["status"] == "healthy"
