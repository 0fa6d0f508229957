"""The SnapStart hooks: registered by the Lambda handler under SnapStart, what runs before the snapshot
(warm-up, S3 pools closed) and after each restore (reseed, keys re-read, telemetry)."""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
import snapshot_restore_py
import torch
from fastapi.testclient import TestClient
from moto import mock_aws

from function.api.factory import create_app
from function.aws.lambda_handler import build_handler
from function.aws.secrets import with_secret_keys
from function.aws.snapstart import SnapStartHooks, reseed
from function.engine.engine import Engine
from function.weights.s3 import s3_client
from tests.support.local_aws import SeaweedFS
from tests.support.settings import make_settings
from tests.support.snapstart import established_tcp


@pytest.fixture
def registries() -> Iterator[None]:
    """snapshot_restore_py's registries are process-wide lists: restored after each test."""
    before, after = (
        list(snapshot_restore_py.get_before_snapshot()),
        list(snapshot_restore_py.get_after_restore()),
    )
    yield
    snapshot_restore_py.get_before_snapshot()[:] = before
    snapshot_restore_py.get_after_restore()[:] = after


def samples_in_forked_children(after_fork: Any) -> list[tuple[float, list[int]]]:
    """Seed this process, fork two children (restored environments), run `after_fork` in each, sample."""
    torch.manual_seed(1234)
    random.seed(1234)
    results = []
    for _ in range(2):
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child reports through the pipe)
            try:
                after_fork()
                os.write(
                    write, json.dumps([random.random(), torch.randint(0, 10**6, (4,)).tolist()]).encode()
                )
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            results.append(tuple(json.loads(pipe.read())))
        os.waitpid(pid, 0)
    return results  # type: ignore[return-value]


def test_without_a_reseed_environments_forked_from_one_snapshot_sample_alike() -> None:
    first, second = samples_in_forked_children(lambda: None)

    # torch's generator (the one generation samples from) is copied into every child alike: the reason for
    # the after-restore reseed. (Python's `random` reseeds itself after a fork; after a real restore, which
    # is no fork, it would not, so the hook reseeds it too.)
    assert first[1] == second[1]


def test_after_the_reseed_each_restored_environment_samples_its_own_way() -> None:
    first, second = samples_in_forked_children(reseed)

    assert first[0] != second[0] and first[1] != second[1]


def test_the_handler_registers_the_hooks_under_snapstart_only(registries: None, demo_model_dir: Path) -> None:
    registered = len(snapshot_restore_py.get_after_restore())
    on_demand = make_settings(model_path=str(demo_model_dir), aws_lambda_function_name="f")
    build_handler(on_demand, Engine(on_demand))
    assert len(snapshot_restore_py.get_after_restore()) == registered

    snap = on_demand.model_copy(update={"aws_lambda_initialization_type": "snap-start"})
    build_handler(snap, Engine(snap))

    before = snapshot_restore_py.get_before_snapshot()[-1][0]
    after = snapshot_restore_py.get_after_restore()[-1][0]
    assert before.__qualname__ == "SnapStartHooks.before_snapshot"
    assert after.__qualname__ == "SnapStartHooks.after_restore" and after.__self__ is before.__self__


def test_before_the_snapshot_the_model_is_warm_and_no_s3_connection_stays_open(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN an engine loaded without its warm-up, and an S3 client with a pooled (kept-alive) connection
    server = SeaweedFS(tmp_path / "seaweedfs").start()
    port = server.s3_port
    try:
        for name, value in server.environment().items():
            monkeypatch.setenv(name, value)
        client = s3_client()
        client.list_buckets()
        assert [peer for peer in established_tcp() if peer.endswith(f":{port}")]
        settings = make_settings(model_path=str(demo_model_dir), warm_up="false")
        engine = Engine(settings)
        engine.load_startup_model()
        assert (engine.cold_start() or {})["warm_up_s"] is None
        hooks = SnapStartHooks(engine, create_app(settings, engine), lambda: settings)

        # WHEN the before-snapshot hook runs
        hooks.before_snapshot()

        # THEN the model was warmed up and the connection is closed (the client still works afterwards)
        assert (engine.cold_start() or {})["warm_up_s"] is not None
        assert not [peer for peer in established_tcp() if peer.endswith(f":{port}")]
        assert "Buckets" in client.list_buckets()
    finally:
        server.stop()


def test_after_a_restore_the_api_keys_are_read_again_from_their_secret(
    aws_credentials: None, demo_model_dir: Path
) -> None:
    with mock_aws():
        secrets = boto3.client("secretsmanager", region_name="us-east-1")
        arn = secrets.create_secret(Name="keys", SecretString=json.dumps({"api_keys": ["old-key"]}))["ARN"]
        base = make_settings(model_path=str(demo_model_dir), api_keys_secret_arn=arn)
        settings = with_secret_keys(base)
        engine = Engine(settings)
        engine.load_startup_model()
        app = create_app(settings, engine)
        hooks = SnapStartHooks(engine, app, lambda: with_secret_keys(base))
        hooks.before_snapshot()
        secrets.put_secret_value(SecretId=arn, SecretString=json.dumps({"api_keys": ["new-key"]}))  # rotated

        hooks.after_restore()

        client = TestClient(app)
        assert client.get("/model_info", headers={"X-API-Key": "new-key"}).status_code == 200
        assert client.get("/model_info", headers={"X-API-Key": "old-key"}).status_code == 401


def test_the_restore_is_a_phase_of_the_cold_start_and_the_first_token_is_measured_again(
    demo_model_dir: Path,
) -> None:
    settings = make_settings(model_path=str(demo_model_dir))
    engine = Engine(settings)
    engine.load_startup_model()
    app = create_app(settings, engine)
    hooks = SnapStartHooks(engine, app, lambda: settings)
    hooks.before_snapshot()

    hooks.after_restore()
    restored = dict(engine.cold_start() or {})
    TestClient(app).post("/generate", json={"prompt": "Hello", "max_new_tokens": 2})
    after_request = engine.cold_start() or {}

    assert restored["restored"] is True and 0 <= restored["restore_s"] < 10
    assert restored["snapshot_age_s"] is not None and restored["first_token_s"] is None
    assert restored["warm_up_s"] is not None  # the INIT's warm-up is kept
    assert after_request["first_token_s"] is not None
    info = TestClient(app).get("/model_info").json()["cold_start"]
    assert info["restored"] is True and info["restore_s"] == restored["restore_s"]
