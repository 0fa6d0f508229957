"""The start-up model: its warm-up, and the retry after a failed load."""

from __future__ import annotations

from pathlib import Path

import pytest

from function.engine.engine import Engine
from function.engine.types import SamplingParams
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


@pytest.mark.parametrize(
    ("lambda_name", "initialization", "warms_up"),
    [(None, None, True), ("fn", "on-demand", False), ("fn", "snap-start", True)],
)
def test_the_start_up_model_is_warmed_up_in_server_mode_and_before_a_snapshot(
    demo_model_dir: Path, lambda_name: str | None, initialization: str | None, warms_up: bool
) -> None:
    # GIVEN WARM_UP=auto and a response cache
    settings = make_settings(
        model_path=str(demo_model_dir),
        aws_lambda_function_name=lambda_name,
        aws_lambda_initialization_type=initialization,
        response_cache_size=8,
    )
    engine = Engine(settings)

    # WHEN the start-up model loads
    engine.load_startup_model()

    # THEN it warmed up in server mode and in a SnapStart INIT, not in an on-demand INIT (10 s limit); the
    # warm-up left the response cache empty and the first-token phase for the first real request
    phases = engine.cold_start() or {}
    assert (phases["warm_up_s"] is not None) is warms_up
    assert phases["first_token_s"] is None and len(engine.cache) == 0
    engine.generate("Hello", SamplingParams(max_new_tokens=2, do_sample=False))
    assert (engine.cold_start() or {})["first_token_s"] is not None


def test_warm_up_false_skips_it_and_true_forces_it_on_demand(demo_model_dir: Path) -> None:
    for value, expected in (("false", False), ("true", True)):
        settings = make_settings(model_path=str(demo_model_dir), warm_up=value, aws_lambda_function_name="fn")
        engine = Engine(settings)
        engine.load_startup_model()
        assert ((engine.cold_start() or {})["warm_up_s"] is not None) is expected
