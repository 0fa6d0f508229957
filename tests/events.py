"""Load the sample events in events/ (full, realistic payloads) for tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

EVENTS_DIR = Path(__file__).resolve().parents[1] / "events"


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
