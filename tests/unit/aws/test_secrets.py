"""API keys from Secrets Manager (moto): read once at init, and fail closed when unreadable."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from fastapi.testclient import TestClient
from moto import mock_aws

from function.api.factory import create_app
from function.aws.secrets import SECRET_READ_BUDGET_S, with_secret_keys
from function.engine.engine import Engine
from tests.support.settings import make_settings


@pytest.fixture
def secrets(aws_credentials: None) -> Iterator[Any]:
    with mock_aws():
        yield boto3.client("secretsmanager", region_name="us-east-1")


def test_keys_are_read_from_secrets_manager(secrets: Any, demo_model_dir: Path) -> None:
    arn = secrets.create_secret(
        Name="llm-function/keys",
        SecretString=json.dumps({"api_keys": "s-user-1, s-user-2", "admin_api_keys": ["s-admin"]}),
    )["ARN"]

    settings = with_secret_keys(make_settings(api_keys_secret_arn=arn), secrets)

    assert settings.api_keys == ["s-user-1", "s-user-2"] and settings.admin_api_keys == ["s-admin"]
    client = TestClient(create_app(settings, Engine(settings)))
    assert (
        client.get("/model_info", headers={"X-API-Key": "s-user-2"}).status_code == 503
    )  # authorized; no model
    assert client.get("/model_info").status_code == 401


def test_an_unreadable_secret_fails_closed(secrets: Any) -> None:
    settings = with_secret_keys(
        make_settings(api_keys_secret_arn="arn:aws:secretsmanager:us-east-1:1:secret:gone"), secrets
    )
    client = TestClient(create_app(settings, Engine(settings)))

    assert settings.auth_enabled
    for key in (None, "anything", ""):
        headers = {"X-API-Key": key} if key is not None else {}
        assert client.post("/generate", json={"prompt": "x"}, headers=headers).status_code == 401
    assert client.post("/load_model", params={"model_path": "/x"}).status_code == 403


def test_an_unanswering_secrets_endpoint_fails_closed_within_the_budget(
    aws_credentials: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN an endpoint that takes the connection and never answers (inside the 10 s INIT or restore)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("AWS_ENDPOINT_URL_SECRETS_MANAGER", f"http://127.0.0.1:{silent.getsockname()[1]}")
        settings = make_settings(api_keys_secret_arn="arn:aws:secretsmanager:us-east-1:1:secret:keys")

        started = time.monotonic()
        read = with_secret_keys(settings)
        elapsed = time.monotonic() - started

    # THEN it gives up within its budget (botocore's defaults wait minutes) and every key is refused
    assert elapsed < SECRET_READ_BUDGET_S + 1
    assert read.auth_enabled and "anything" not in read.api_keys + read.admin_api_keys
