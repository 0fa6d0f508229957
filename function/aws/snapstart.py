"""Lambda SnapStart: what runs before the snapshot, and after each restore from it.

A SnapStart version runs its INIT once, when it is published (imports, the weight fetch straight into
memory, the load, the warm-up), then Lambda snapshots the process; every new execution environment
resumes from that snapshot. `awslambdaric` runs the `snapshot_restore_py` hooks registered here:

- before the snapshot: the warm-up generation if the INIT did not run one (WARM_UP=false), then every
  S3 client's connection pool is closed, so no connection that is dead by the restore is in it;
- after each restore: Python's and torch's random state are reseeded from fresh entropy (environments
  restored from one snapshot would otherwise sample alike), the API keys are read again from their
  secret when one is configured (a rotated key takes effect for new environments), AWS clients are
  built anew on their next use, and the restore is recorded in the cold-start telemetry
  (`/model_info` `cold_start`, its JSON log line and the EMF metrics).

Restores must finish their hooks within 10 s; these take milliseconds, plus one secret read.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from function.config import Settings
from function.engine.engine import Engine
from function.weights.s3 import close_clients

logger = logging.getLogger(__name__)


@dataclass
class SnapStartHooks:
    """The hooks of one Lambda handler: its engine, and the app whose settings hold the API keys."""

    engine: Engine
    app: Any  # the FastAPI app: `app.state.settings` is what the auth dependency reads
    refresh_settings: Callable[[], Settings]
    snapshot_at: float | None = None
    restores: int = 0
    log: list[str] = field(default_factory=list)

    def before_snapshot(self) -> None:
        phases = self.engine.cold_start() or {}
        if self.engine.current is not None and phases.get("warm_up_s") is None:
            self.engine.warm_up()
        closed = close_clients()
        self.snapshot_at = time.time()
        self.log.append("before_snapshot")
        logger.info("SnapStart: warmed up, %d S3 client(s) closed; ready for the snapshot", closed)

    def after_restore(self) -> None:
        started = time.perf_counter()
        reseed()
        close_clients()  # none should be open; any that is would hold the snapshot's connections
        if self.engine.settings.api_keys_secret_arn:
            self.app.state.settings = self.refresh_settings()
        self.restores += 1
        age = None if self.snapshot_at is None else time.time() - self.snapshot_at
        self.engine.telemetry.record_restore(time.perf_counter() - started, age)
        self.log.append("after_restore")
        logger.info("SnapStart: restored (random state reseeded, settings refreshed)")


def reseed() -> None:
    """Fresh entropy for every random generator a generation may use: Python's, torch's (CPU and CUDA)
    and NumPy's when it is imported."""
    import sys

    import torch

    random.seed(os.urandom(32))
    torch.manual_seed(int.from_bytes(os.urandom(8), "little") & ((1 << 63) - 1))
    numpy = sys.modules.get("numpy")
    if numpy is not None:
        numpy.random.seed(int.from_bytes(os.urandom(4), "little"))


def register_hooks(engine: Engine, app: Any, refresh_settings: Callable[[], Settings]) -> SnapStartHooks:
    """Register the hooks with `snapshot_restore_py` (which awslambdaric runs under SnapStart)."""
    from snapshot_restore_py import register_after_restore, register_before_snapshot

    hooks = SnapStartHooks(engine, app, refresh_settings)
    register_before_snapshot(hooks.before_snapshot)
    register_after_restore(hooks.after_restore)
    return hooks
