"""Fetchers on fake disks: one that fills up mid-download, one whose free space is a fixed number."""

from __future__ import annotations

import errno
import threading
from typing import Any

from function.weights.fetcher import ModelFetcher


class FillingDisk(ModelFetcher):
    """A cache whose disk fills up once `capacity` bytes are written: every write past it fails with
    ENOSPC, as a real full disk answers, though the free space looked big enough when the fetch began."""

    def __init__(self, *args: Any, capacity: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.capacity = capacity
        self.writes_refused = 0
        self._written = 0
        self._lock = threading.Lock()

    def _write_chunk(self, handle: Any, chunk: bytes) -> None:
        with self._lock:
            full = self._written + len(chunk) > self.capacity
            if full:
                self.writes_refused += 1
            else:
                self._written += len(chunk)
        if full:
            raise OSError(errno.ENOSPC, "No space left on device")
        super()._write_chunk(handle, chunk)


class FixedFreeSpace(ModelFetcher):
    """A cache whose filesystem reports `free` bytes free, however much is written: what a disk with
    sparse `.part` files reports while a download has yet to fill them."""

    def __init__(self, *args: Any, free: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.free = free

    def free_bytes(self) -> int:
        return self.free
