"""Shared fixtures: real demo models built once per session, settings that ignore the caller's .env."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from function.app import create_app
from function.config import Settings
from function.demo_model import DemoModelSize, build_demo_model
from function.engine import ModelManager

# Small limits keep every at-the-limit request quick on a 2-core CI machine.
TEST_MAX_NEW_TOKENS = 24
TEST_MAX_SEQUENCES = 3


@pytest.fixture(autouse=True)
def _no_service_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's MODEL_PATH or limits in the shell must not change what the tests see."""
    for name in (
        "MODEL_PATH",
        "LOAD_IN_8BIT",
        "LOAD_IN_4BIT",
        "MAX_NEW_TOKENS",
        "MAX_NUM_RETURN_SEQUENCES",
        "CPU_DTYPE",
        "USE_CHAT_TEMPLATE",
        "INSTRUCTION_TEMPLATE",
        "INSTRUCTION_INPUT_TEMPLATE",
        "API_KEYS",
        "ADMIN_API_KEYS",
        "API_KEYS_SECRET_ARN",
        "ALLOWED_MODEL_PATHS",
        "ALLOW_RUNTIME_MODEL_LOAD",
        "MAX_REQUEST_BYTES",
        "MAX_PROMPT_TOKENS",
        "RATE_LIMIT",
        "AWS_LAMBDA_FUNCTION_NAME",
        "RESPONSE_CACHE_SIZE",
        "BATCH_MAX_SIZE",
        "BATCH_WINDOW_MS",
        "BATCH_REDUCED_PRECISION",
        "TORCH_COMPILE",
    ):
        monkeypatch.delenv(name, raising=False)


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


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "max_new_tokens": TEST_MAX_NEW_TOKENS,
        "max_num_return_sequences": TEST_MAX_SEQUENCES,
        "cpu_dtype": "float32",
        # Loads may come from the temp directory the tests build models in.
        "allowed_model_paths": [tempfile.gettempdir()],
        "rate_limit": None,  # off unless a test sets one
        "response_cache_size": 0,  # determinism tests must generate twice; the cache has tests of its own
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


@pytest.fixture
def settings_factory() -> Callable[..., Settings]:
    return make_settings


@pytest.fixture(scope="session")
def served_engine(demo_model_dir: Path) -> ModelManager:
    """One loaded engine shared by read-only tests (nothing may swap it)."""
    engine = ModelManager(make_settings(model_path=str(demo_model_dir)))
    engine.load_startup_model()
    assert engine.current is not None
    return engine


@pytest.fixture
def fresh_engine(demo_model_dir: Path) -> ModelManager:
    """An engine of its own, for tests that swap or fail loads."""
    engine = ModelManager(make_settings(model_path=str(demo_model_dir)))
    engine.load_startup_model()
    return engine


@pytest.fixture
def client(served_engine: ModelManager) -> Iterator[TestClient]:
    with TestClient(create_app(served_engine.settings, served_engine)) as test_client:
        yield test_client


class _WritesMarker:
    """Unpickling this runs `touch marker`: the payload a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def write_pickle_only_model(directory: Path, marker: Path) -> Path:
    """A model directory whose only weights are a pickle that creates `marker` if anything unpickles it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_WritesMarker(marker)))
    return directory
