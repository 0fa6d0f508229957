"""API keys: who may call the inference routes, and who may load models.

Keys come in `X-API-Key` (the original guide's header) or `Authorization: Bearer`. They are
compared in constant time against every configured key. `/health` and the docs stay open.
"""

from __future__ import annotations

import hmac
import logging

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
