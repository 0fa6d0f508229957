"""`create_app`: the FastAPI app over an engine, with its routers, error handlers and middleware."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from function import __version__
from function.api import docs, openai_routes, routes
from function.api.auth import warn_if_open
from function.api.dependencies import admit_for_route
from function.api.errors import ERROR_RESPONSES, install_error_handlers
from function.api.middleware import BodySizeLimit, HeaderSizeLimit, mark_cold_response
from function.api.observability import RequestSink, install_observability
from function.api.ratelimit import RateLimiter
from function.config import Settings, get_settings
from function.engine.engine import Engine, get_engine


def create_app(
    settings: Settings | None = None,
    engine: Engine | None = None,
    request_sink: RequestSink | None = None,
) -> FastAPI:
    """Build the API. Without arguments: the process-wide settings and engine (which loads MODEL_PATH)."""
    settings = settings or get_settings()
    engine = engine or get_engine(settings)
    app = FastAPI(
        title="llm-function",
        version=__version__,
        description="A fine-tuned causal language model behind the original server guide's API.",
        responses=ERROR_RESPONSES,
        docs_url=None,  # docs.router serves them from the package: FastAPI's own load a CDN's assets
        redoc_url=None,
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.rate_limiter = (
        RateLimiter(settings.rate_limit) if settings.rate_limit and not settings.on_lambda else None
    )
    warn_if_open(settings)
    install_error_handlers(app, admit=admit_for_route)
    publish_server_limits(app, settings)
    app.include_router(openai_routes.router)
    mark_cold_response(app)
    install_observability(app, sink=request_sink)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(HeaderSizeLimit, max_bytes=settings.max_header_bytes)  # the outermost: added last
    app.include_router(routes.router)
    app.include_router(docs.router)
    return app


def publish_server_limits(app: FastAPI, settings: Settings) -> None:
    """Put the settings' bounds (MAX_NEW_TOKENS, MAX_MESSAGES, …) and adapter names into /openapi.json, so
    the docs state what requests meet, and lower the request examples to the bounds, so "Try it out" sends
    what this server accepts."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        components = schema["components"]["schemas"]
        bounds = {
            "max_new_tokens": settings.max_new_tokens,
            "max_tokens": settings.max_new_tokens,
            "max_completion_tokens": settings.max_new_tokens,
            "num_return_sequences": settings.max_num_return_sequences,
            "n": settings.max_num_return_sequences,
        }
        for model in ("GenerateRequest", "ChatRequest", "CompletionRequest", "ChatCompletionRequest"):
            component = components.get(model, {})
            for name, field in component.get("properties", {}).items():
                if name in bounds:
                    for branch in field.get("anyOf", [field]):  # optional fields: bound the integer branch
                        if branch.get("type") == "integer":
                            branch["maximum"] = bounds[name]
            messages = component.get("properties", {}).get("messages")
            if messages is not None:  # MAX_MESSAGES, under the schema's static ceiling
                messages["maxItems"] = min(
                    messages.get("maxItems", settings.max_messages), settings.max_messages
                )
            stop = component.get("properties", {}).get("stop")
            if (
                stop is not None
            ):  # each stop string's character cap (the token and total caps can't be stated)
                for branch in stop.get("anyOf", [stop]):
                    items = branch.get("items") if branch.get("type") == "array" else branch
                    if isinstance(items, dict) and items.get("type") == "string":
                        items["maxLength"] = settings.max_stop_string_chars
            if "adapter" in component.get("properties", {}):  # the adapters this server loads, by name
                named = [{"type": "string", "enum": list(settings.adapters)}] if settings.adapters else []
                component["properties"]["adapter"]["anyOf"] = [*named, {"type": "null"}]
            if "examples" in component:  # new dicts: the model's own examples keep the guide's numbers
                order = list(component.get("properties", {}))
                component["examples"] = [
                    example_within_bounds(example, bounds, order) for example in component["examples"]
                ]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def example_within_bounds(
    example: dict[str, Any], bounds: dict[str, int], order: list[str]
) -> dict[str, Any]:
    """The example with each bounded integer lowered to its bound, its keys in field order (pydantic
    sorts them, which would put `do_sample` before `prompt`)."""
    names = sorted(example, key=lambda name: order.index(name) if name in order else len(order))
    return {
        name: min(example[name], bounds[name])
        if name in bounds and isinstance(example[name], int)
        else example[name]
        for name in names
    }
