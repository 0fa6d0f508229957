"""API keys from Secrets Manager, read at init: `API_KEYS_SECRET_ARN` holds
`{"api_keys": …, "admin_api_keys": …}` (lists or comma-separated strings)."""

from __future__ import annotations

import json
import logging
from typing import Any

from function.config import Settings

logger = logging.getLogger(__name__)

SECRET_CLIENT_LIMITS: dict[str, Any] = {
    "connect_timeout": 2,
    "read_timeout": 2,
    "retries": {"max_attempts": 2, "mode": "standard"},
}
SECRET_READ_BUDGET_S = 8  # measured 6 s against an endpoint that never answers


def keys_from_secret(secret_arn: str, client: Any | None = None) -> tuple[list[str], list[str]]:
    """Read `{"api_keys": …, "admin_api_keys": …}` (lists or comma-separated strings) from Secrets Manager."""
    if client is None:
        import boto3
        from botocore.config import Config

        # Bounded: the read runs inside Lambda's 10 s INIT and its 10 s after-restore limit (SnapStart);
        # an unreachable endpoint fails closed within SECRET_READ_BUDGET_S instead of botocore's minutes.
        own = boto3.client("secretsmanager", config=Config(**SECRET_CLIENT_LIMITS))
        try:  # closed after the one read: no connection stays open (and none goes into a SnapStart snapshot)
            return keys_from_secret(secret_arn, own)
        finally:
            own.close()
    document = json.loads(client.get_secret_value(SecretId=secret_arn)["SecretString"])

    def keys(name: str) -> list[str]:
        value = document.get(name) or []
        items = value.split(",") if isinstance(value, str) else value
        return [str(item).strip() for item in items if str(item).strip()]

    return keys("api_keys"), keys("admin_api_keys")


def with_secret_keys(settings: Settings, client: Any | None = None) -> Settings:
    """Settings with the keys of API_KEYS_SECRET_ARN added, read once (at Lambda init).

    A secret that can't be read fails closed: every guarded route refuses (no key will match).
    """
    if not settings.api_keys_secret_arn:
        return settings
    try:
        user, admin = keys_from_secret(settings.api_keys_secret_arn, client)
    except Exception:  # any failure must leave the service closed, never open
        logger.exception("API keys could not be read from the secret: every guarded route will refuse")
        return settings.model_copy(update={"api_keys": ["\0unreadable-secret\0"], "admin_api_keys": []})
    if not user and not admin:
        logger.error("the API key secret holds no keys: every guarded route will refuse")
        user = ["\0empty-secret\0"]
    return settings.model_copy(
        update={"api_keys": settings.api_keys + user, "admin_api_keys": settings.admin_api_keys + admin}
    )
