"""Request dependencies shared by every router: the engine, and who may call what."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from function.api.auth import presented_key, require_admin, require_user
from function.api.ratelimit import RateLimiter
from function.config import Settings
from function.engine.engine import Engine
from function.errors import UnauthorizedError

api_key_scheme = APIKeyHeader(
    name="X-API-Key", auto_error=False, description="API key (the original guide's header)"
)
bearer_scheme = HTTPBearer(auto_error=False, description="The same API key as a bearer token")
ApiKeyHeader = Annotated[str | None, Security(api_key_scheme)]
BearerToken = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]


def current_engine(request: Request) -> Engine:
    """The engine the app was built with (`create_app(settings, engine)`)."""
    engine: Engine = request.app.state.engine
    return engine


EngineDep = Annotated[Engine, Depends(current_engine)]


def _admit(request: Request, x_api_key: str | None, *, admin: bool) -> None:
    settings: Settings = request.app.state.settings
    key = presented_key(x_api_key, request.headers.get("authorization"))
    limiter: RateLimiter | None = request.app.state.rate_limiter
    client = request.client.host if request.client else None
    try:
        (require_admin if admin else require_user)(settings, key)
    except UnauthorizedError:
        if limiter is not None:  # failed keys count against the client's address: no free guessing
            limiter.hit(None, client)
        raise
    if limiter is not None:
        limiter.hit(key, client)


def user_access(request: Request, x_api_key: ApiKeyHeader = None, _bearer: BearerToken = None) -> None:
    """Inference routes: a user or admin key (when keys are configured), then the rate limit."""
    _admit(request, x_api_key, admin=False)


def admin_access(request: Request, x_api_key: ApiKeyHeader = None, _bearer: BearerToken = None) -> None:
    """/load_model: an admin key (when keys are configured), then the rate limit."""
    _admit(request, x_api_key, admin=True)


def route_access(route: object) -> Literal["user", "admin"] | None:
    """The key a route requires, read from its dependencies (its router's included): None when open."""
    pending = [getattr(route, "dependant", None)]
    found: Literal["user", "admin"] | None = None
    while pending:
        dependant = pending.pop()
        if dependant is None:
            continue
        if dependant.call is admin_access:
            return "admin"
        if dependant.call is user_access:
            found = "user"
        pending.extend(dependant.dependencies)
    return found


def admit_for_route(request: Request) -> None:
    """The matched route's key check and rate limit, for errors FastAPI raises before the route's
    dependencies run (it parses the body first): a wrong key is a 401 whatever the body."""
    access = route_access(request.scope.get("route"))
    if access is not None:
        _admit(request, request.headers.get(api_key_scheme.model.name), admin=access == "admin")
