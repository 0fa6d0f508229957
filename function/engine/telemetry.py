"""Cold-start telemetry: the phases of this process's start, up to the first token of the first request.

The entry point measures its imports (`startup_phases`: `began`, `imports_s`,
`rss_after_imports_mb`); the engine adds the start-up model's fetch and load, and the first
token. Logged once as a JSON line, shown in /model_info, and sent as metrics on Lambda.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from function.weights.loading import LoadedModel

logger = logging.getLogger(__name__)


def resident_mb() -> float | None:
    """This process's resident memory now (Linux)."""
    try:
        status = Path("/proc/self/status").read_text(encoding="utf-8")
    except OSError:
        return None
    line = next((line for line in status.splitlines() if line.startswith("VmRSS:")), None)
    return round(int(line.split()[1]) / 1024, 1) if line else None


class ColdStartTelemetry:
    def __init__(self, startup_phases: dict[str, Any] | None = None) -> None:
        self.startup_phases = dict(startup_phases or {})
        self._phases: dict[str, Any] | None = None
        self._first_token_pending = True

    @property
    def first_token_pending(self) -> bool:
        return self._first_token_pending

    def record_load(self, loaded: LoadedModel) -> None:
        """The start-up model is ready: its fetch and load phases."""
        fetch = loaded.fetch
        began = self.startup_phases.get("began")
        self._phases = {
            "imports_s": self.startup_phases.get("imports_s"),
            "rss_after_imports_mb": self.startup_phases.get("rss_after_imports_mb"),
            "ready_s": None if began is None else round(time.perf_counter() - began, 4),
            "fetch_s": round(fetch.seconds if fetch else loaded.resolve_seconds, 4),
            "fetch_bytes": fetch.bytes_downloaded if fetch else 0,
            "fetch_mb_per_s": round(fetch.megabytes_per_second, 1) if fetch else None,
            "fetch_from_cache": fetch.from_cache if fetch else None,
            "load_s": round(loaded.load_seconds, 4),
            "fetch_in_memory": fetch.in_memory if fetch else None,
            "warm_up_s": None,
            "first_token_s": None,
        }

    def record_warm_up(self, seconds: float) -> None:
        if self._phases is not None:
            self._phases["warm_up_s"] = round(seconds, 4)

    def record_restore(self, restore_s: float, snapshot_age_s: float | None) -> None:
        """This process resumed from a SnapStart snapshot: the after-restore hooks took `restore_s`. The
        phases before it are the snapshot INIT's; the first token is measured again, from here."""
        self._first_token_pending = True
        if self._phases is not None:
            self._phases.update(
                restored=True,
                restore_s=round(restore_s, 4),
                snapshot_age_s=None if snapshot_age_s is None else round(snapshot_age_s, 1),
                first_token_s=None,
            )

    def first_token_recorder(self, started: float) -> Callable[[], None] | None:
        """A callback for the first token of a generation that began at `started` (perf_counter),
        or None once the first token of this process has been recorded."""
        if not self._first_token_pending:
            return None

        def record() -> None:
            if not self._first_token_pending:
                return
            self._first_token_pending = False
            if self._phases is not None:
                self._phases["first_token_s"] = round(time.perf_counter() - started, 4)
                logger.info(json.dumps({"event": "cold_start", **self._phases}))

        return record

    def phases(self) -> dict[str, Any] | None:
        """The start-up phases, or None when no start-up model was loaded."""
        return None if self._phases is None else dict(self._phases)
