"""Admission control for server mode: at most `settings.queue_limit` generation requests at once.

A request holds its place while it runs or waits (a stream: to its last chunk); past the limit the
next one gets `OverloadedError` (503 with Retry-After) at once instead of a place in an unbounded
queue. On Lambda every request is admitted: one runs per execution environment.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from function.config import Settings
from function.errors import OverloadedError


class Admission:
    """One generation request's place among those admitted at once (`Engine.admit`). `release`, or the
    end of its `with` block, gives it back; a second release does nothing."""

    def __init__(self, release: Callable[[], None] | None) -> None:
        self._release = release
        self._lock = threading.Lock()

    def release(self) -> None:
        with self._lock:
            release, self._release = self._release, None
        if release is not None:
            release()

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *_: object) -> None:
        self.release()


class AdmissionControl:
    """Counts the admitted requests of one engine."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Generation requests admitted now: running, or waiting for their turn."""
        return self._admitted

    def admit(self) -> Admission:
        """A place for one generation request; OverloadedError past the limit (server mode only)."""
        if self.settings.on_lambda:
            return Admission(None)
        limit = self.settings.queue_limit
        with self._lock:
            if self._admitted >= limit:
                raise OverloadedError(
                    f"the server is busy: {limit} generation requests are running or waiting, its limit; "
                    "retry in a second",
                    limit=limit,
                )
            self._admitted += 1
        return Admission(self._leave)

    def _leave(self) -> None:
        with self._lock:
            self._admitted -= 1
