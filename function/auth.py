"""API keys: who may call the inference routes, and who may load models.

Keys come in `X-API-Key` (the original guide's header) or `Authorization: Bearer`. They are
compared in constant time against every configured key. `/health` and the docs stay open.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any

from function.config import Settings
from function.errors import ForbiddenError, UnauthorizedError

logger = logging.getLogger(__name__)


def presented_key(api_key_header: str | None, authorization: str | None) -> str | None:
    if api_key_header:
        return api_key_header.strip() or None
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def key_matches(candidate: str, keys: list[str]) -> bool:
    """Constant time per key, and every key is compared: timing says nothing about which matched."""
    matched = False
    for key in keys:
        matched |= hmac.compare_digest(candidate.encode(), key.encode())
    return matched


def require_user(settings: Settings, key: str | None) -> None:
    """Inference routes: any user or admin key, or open when no keys are configured."""
    if not settings.auth_enabled:
        return
    if key is None:
        raise UnauthorizedError("an API key is required: send it in X-API-Key or Authorization: Bearer")
    if not key_matches(key, settings.api_keys + settings.admin_api_keys):
        raise UnauthorizedError("the API key is not valid")


def require_admin(settings: Settings, key: str | None) -> None:
    """/load_model: an admin key; refused outright when only user keys are configured."""
    if not settings.auth_enabled:
        return
    if not settings.admin_api_keys:
        raise ForbiddenError("runtime model loading is disabled: ADMIN_API_KEYS is not set")
    if key is None:
        raise UnauthorizedError("an admin API key is required: send it in X-API-Key or Authorization: Bearer")
    if key_matches(key, settings.admin_api_keys):
        return
    if key_matches(key, settings.api_keys):
        raise ForbiddenError("this API key may not load models: an admin key is required")
    raise UnauthorizedError("the API key is not valid")


def warn_if_open(settings: Settings) -> None:
    if not settings.auth_enabled:
        logger.warning(
            "API_KEYS and ADMIN_API_KEYS are not set: every route is open, including /load_model. "
            "Fine for local development; set keys before exposing this server."
        )


def keys_from_secret(secret_arn: str, client: Any | None = None) -> tuple[list[str], list[str]]:
    """Read `{"api_keys": …, "admin_api_keys": …}` (lists or comma-separated strings) from Secrets Manager."""
    if client is None:
        import boto3

        client = boto3.client("secretsmanager")
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
