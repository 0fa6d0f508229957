"""Shared fixtures: real demo models built once per session, settings that ignore the caller's .env.

Fixtures only: helpers the tests share are in tests/support/.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.config import Settings
from function.demo_model import DemoModelSize, build_demo_model
from function.engine.engine import Engine
from tests.support.adapters import build_lora_adapter
from tests.support.settings import make_settings

# Every variable Settings reads: pydantic-settings maps field `model_path` to MODEL_PATH (in any case).
SERVICE_VARIABLES = frozenset(name.upper() for name in Settings.model_fields)


@pytest.fixture(autouse=True)
def _no_service_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's MODEL_PATH or limits in the shell must not change what the tests see."""
    for name in list(os.environ):
        if name.upper() in SERVICE_VARIABLES:
            monkeypatch.delenv(name)


@pytest.fixture
def aws_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fake credentials for moto, and no endpoint override: boto3 talks to moto's in-process mock."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def moto_s3(aws_credentials: None) -> Iterator[Any]:
    """An in-process moto S3 with the buckets the tests use: `models` and `weights`."""
    import boto3
    from moto import mock_aws

    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        for bucket in ("models", "weights"):
            client.create_bucket(Bucket=bucket)
        yield client


@pytest.fixture(scope="session")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def demo_model_dir(models_root: Path) -> Path:
    """The quick start's demo model: no chat template, so /chat uses the instruction format."""
    return build_demo_model(models_root / "final_model")


@pytest.fixture(scope="session")
def chat_model_dir(models_root: Path) -> Path:
    return build_demo_model(models_root / "chat_model", chat_template=True)


@pytest.fixture(scope="session")
def other_model_dir(models_root: Path) -> Path:
    """A second model with other weights, to tell swaps apart."""
    return build_demo_model(models_root / "other_model", seed=1)


@pytest.fixture(scope="session")
def slow_model_dir(models_root: Path) -> Path:
    """Big enough (~25M parameters) that a load lasts long enough to race against."""
    size = DemoModelSize(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536)
    return build_demo_model(models_root / "slow_model", size=size)


@pytest.fixture(scope="session")
def adapter_dir(models_root: Path, demo_model_dir: Path) -> Path:
    """A LoRA adapter over the demo model, as a peft run saves it (its config names the base)."""
    return build_lora_adapter(demo_model_dir, models_root / "adapter_sql", seed=1)


@pytest.fixture(scope="session")
def second_adapter_dir(models_root: Path, demo_model_dir: Path) -> Path:
    return build_lora_adapter(demo_model_dir, models_root / "adapter_chat", seed=2)


@pytest.fixture
def settings_factory() -> Callable[..., Settings]:
    return make_settings


@pytest.fixture(scope="session")
def served_engine(demo_model_dir: Path) -> Engine:
    """One loaded engine shared by read-only tests (nothing may swap it)."""
    engine = Engine(make_settings(model_path=str(demo_model_dir)))
    engine.load_startup_model()
    assert engine.current is not None
    return engine


@pytest.fixture
def fresh_engine(demo_model_dir: Path) -> Engine:
    """An engine of its own, for tests that swap or fail loads."""
    engine = Engine(make_settings(model_path=str(demo_model_dir)))
    engine.load_startup_model()
    return engine


@pytest.fixture
def client(served_engine: Engine) -> Iterator[TestClient]:
    with TestClient(create_app(served_engine.settings, served_engine)) as test_client:
        yield test_client
