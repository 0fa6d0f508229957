"""The HTTP API: thin routes over the engine, and the one error body every error leaves with.

`function.app:app` is built on first access (uvicorn's import), not when this module is
imported, so tests and tools can import `create_app` without loading a model.
"""

from __future__ import annotations

import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse

from function import __version__
from function.auth import warn_if_open
from function.config import Settings, get_settings
from function.dependencies import EngineDep, admin_access, user_access
from function.engine import ModelManager, get_engine
from function.http_errors import ERROR_RESPONSES, install_error_handlers
from function.loading import quantization_from_flags
from function.middleware import BodySizeLimit, mark_cold_response
from function.observability import RequestSink, install_observability, record_generation
from function.openai_routes import build_router as build_openai_router
from function.ratelimit import RateLimiter
from function.schemas import (
    ChatRequest,
    ChatResponse,
    ColdStart,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    LoadModelResponse,
    LoadTimings,
    ModelInfoResponse,
    Usage,
)

logger = logging.getLogger(__name__)


def gigabytes(num_bytes: float) -> str:
    """The original guide's memory format: "3.45 GB"."""
    return f"{num_bytes / 1024**3:.2f} GB"


def human_size(num_bytes: float) -> str:
    return gigabytes(num_bytes) if num_bytes >= 1024**3 else f"{num_bytes / 1024**2:.2f} MB"


def create_app(
    settings: Settings | None = None,
    engine: ModelManager | None = None,
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
    )
    app.state.engine = engine
    app.state.settings = settings
    app.state.rate_limiter = (
        RateLimiter(settings.rate_limit) if settings.rate_limit and not settings.on_lambda else None
    )
    warn_if_open(settings)
    install_error_handlers(app)
    _publish_server_limits(app, settings)
    app.include_router(build_openai_router())
    mark_cold_response(app)
    install_observability(app, sink=request_sink)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    _add_routes(app)
    return app


def _publish_server_limits(app: FastAPI, settings: Settings) -> None:
    """Put the settings' bounds into /openapi.json, so the docs state the limits requests meet."""
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
            for name, field in components.get(model, {}).get("properties", {}).items():
                if name in bounds:
                    for branch in field.get("anyOf", [field]):  # optional fields: bound the integer branch
                        if branch.get("type") == "integer":
                            branch["maximum"] = bounds[name]
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _add_routes(app: FastAPI) -> None:
    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    def health(engine: EngineDep) -> Any:
        engine.ensure_loaded()
        status = engine.status()
        body = HealthResponse(
            status=status.state,
            model_loaded=status.state == "healthy",
            model_name=status.model_name,
            device=status.device,
            reason=status.reason,
        )
        if status.state == "healthy":
            return body
        return JSONResponse(status_code=503, content=body.model_dump(), headers={"Retry-After": "5"})

    @app.post("/generate", response_model=GenerateResponse, dependencies=[Depends(user_access)])
    def generate(request: GenerateRequest, engine: EngineDep, http: Request) -> GenerateResponse:
        params = request.sampling_params(engine.settings.max_new_tokens)
        result = engine.generate(request.prompt, params)
        record_generation(http, result)
        return GenerateResponse(
            generated_text=[request.prompt + text for text in result.continuations],
            prompt=request.prompt,
            model_name=result.model_name,
            generation_time=result.generation_time,
            finish_reason=result.finish_reasons,
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        )

    @app.post("/chat", response_model=ChatResponse, dependencies=[Depends(user_access)])
    def chat(request: ChatRequest, engine: EngineDep, http: Request) -> ChatResponse:
        params = request.sampling_params(engine.settings.max_new_tokens)
        result = engine.chat(request.instruction, request.input, params)
        record_generation(http, result)
        return ChatResponse(
            response=result.continuations[0].strip(),
            instruction=request.instruction,
            model_name=result.model_name,
            generation_time=result.generation_time,
            finish_reason=result.finish_reasons[0],
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        )

    @app.get("/model_info", response_model=ModelInfoResponse, dependencies=[Depends(user_access)])
    def model_info(engine: EngineDep) -> ModelInfoResponse:
        loaded = engine.require_model()
        allocated, reserved, note = _device_memory(loaded.device)
        return ModelInfoResponse(
            model_name=loaded.name,
            model_path=loaded.path,
            device=loaded.device,
            gpu_memory_allocated=allocated,
            gpu_memory_reserved=reserved,
            memory_note=note,
            model_memory=human_size(loaded.memory_bytes()),
            dtype=loaded.dtype,
            quantization=loaded.quantization,
            parameter_count=loaded.parameter_count,
            context_length=loaded.context_length,
            chat_template=loaded.chat_template,
            load_timings=LoadTimings(
                resolve_s=round(loaded.resolve_seconds, 4),
                load_s=round(loaded.load_seconds, 4),
                total_s=round(loaded.resolve_seconds + loaded.load_seconds, 4),
            ),
            loaded_at=loaded.loaded_at.isoformat(),
            cold_start=ColdStart(**phases) if (phases := engine.cold_start()) else None,
        )

    @app.post("/load_model", response_model=LoadModelResponse, dependencies=[Depends(admin_access)])
    def load_model(
        engine: EngineDep,
        model_path: Annotated[
            str, Query(min_length=1, description="Local directory (s3:// in Lambda builds).")
        ],
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
    ) -> LoadModelResponse:
        quantization = quantization_from_flags(load_in_8bit, load_in_4bit)
        new, previous = engine.load_requested(model_path, quantization)
        return LoadModelResponse(
            status="loaded",
            model_name=new.name,
            model_path=new.path,
            device=new.device,
            quantization=new.quantization,
            load_time=round(new.load_seconds, 4),
            previous_model_name=previous.name if previous else None,
        )


def _device_memory(device: str) -> tuple[str, str, str]:
    if device == "cuda":
        import torch

        return (
            gigabytes(torch.cuda.memory_allocated()),
            gigabytes(torch.cuda.memory_reserved()),
            "CUDA memory held by PyTorch in this process: allocated by tensors, and reserved by its caching "
            "allocator",
        )
    return (
        "0.00 GB",
        "0.00 GB",
        "device is cpu: no GPU memory is in use; the model lives in RAM, see model_memory",
    )


app: FastAPI  # declared, not assigned: built by __getattr__ on first access


def __getattr__(name: str) -> Any:
    """`function.app:app` for uvicorn: built once, on first access."""
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)
