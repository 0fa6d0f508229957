"""Space in the model cache, shared by the fetches of one process.

A fetch creates its `.part` files at full size, but sparse: the free space they will take shows in
`disk_usage` only as they are written. Each fetch therefore reserves what it has yet to write, and
the next one counts those reservations against the free space.
"""

from __future__ import annotations

import errno
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

from function.errors import ModelLoadError

NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


@dataclass
class Reservation:
    device: int  # the cache's filesystem
    remaining: int  # bytes the fetch has yet to write


class SpaceLedger:
    """What the fetches of this process have yet to write, per filesystem. Their `.part` files are
    sparse until written, so two fetches that each fit the free space could otherwise both start,
    and both run out of it."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._open: list[Reservation] = []

    def reserve(
        self, device: int, needed: int, free_bytes: Callable[[], int], margin: int = 0
    ) -> Reservation:
        with self._lock:
            promised = sum(r.remaining for r in self._open if r.device == device)
            available = free_bytes() - promised
            if available < needed + margin:
                raise no_space_error(needed, available=available, promised=promised)
            reservation = Reservation(device, needed)
            self._open.append(reservation)
            return reservation

    def written(self, reservation: Reservation, size: int) -> None:
        with self._lock:
            reservation.remaining = max(0, reservation.remaining - size)

    def release(self, reservation: Reservation) -> None:
        with self._lock:
            self._open = [r for r in self._open if r is not reservation]


SPACE = SpaceLedger()


def no_space_error(needed: int | None, *, available: int | None = None, promised: int = 0) -> ModelLoadError:
    """The one answer to a full cache, whether foreseen (`available` given) or met while writing."""
    parts = [] if needed is None else [f"it needs {_megabytes(needed)} MB"]
    if available is not None:
        parts.append(f"{_megabytes(max(0, available))} MB are free")
    if promised:
        parts[-1] += f" beyond the {_megabytes(promised)} MB that downloads in progress have yet to write"
    return ModelLoadError(
        "no space left in the model cache directory (MODEL_CACHE_DIR)"
        + (": " + ", ".join(parts) if parts else "")
        + "; raise the function's ephemeral storage",
        field="model_path",
    )


def _megabytes(size: int) -> int:
    return math.ceil(size / 1e6)


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE_ERRNOS
