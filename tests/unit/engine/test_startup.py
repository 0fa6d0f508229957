"""The start-up model's retry after a failed load."""

from __future__ import annotations

from pathlib import Path

from function.engine.engine import Engine
from tests.support.settings import make_settings
from tests.support.waiting import wait_until


def test_a_due_start_up_retry_runs_in_the_background(tmp_path: Path, demo_model_dir: Path) -> None:
    # GIVEN a failed start-up load whose model directory appears later
    target = tmp_path / "late_model"
    engine = Engine(make_settings(model_path=str(target), load_retry_interval_s=0))
    engine.load_startup_model()
    assert engine.status().state == "unhealthy"
    target.symlink_to(demo_model_dir, target_is_directory=True)

    # WHEN /health's retry is started: it returns without waiting for the load
    engine.ensure_loaded_in_background()

    # THEN the engine says "loading" until the model is in, then "healthy"
    assert engine.status().state in ("loading", "healthy")
    assert wait_until(lambda: engine.status().state == "healthy", 60)


# Stop strings on the decoded text.
