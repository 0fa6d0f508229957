"""The HTTP API: thin routes over the engine, and the one error body every error leaves with.

`function.app:app` is built on first access (uvicorn's import), not when this module is
imported, so tests and tools can import `create_app` without loading a model.
"""

from __future__ import annotations

import itertools
import logging
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from function import __version__
from function.config import Settings, get_settings
from function.engine import ModelManager, get_engine
from function.errors import (
    ContextLengthExceededError,
    InvalidRequestError,
    LLMFunctionError,
    ModelLoadError,
    ModelLoadInProgressError,
    ModelNotLoadedError,
)
from function.loading import quantization_from_flags
from function.schemas import (
    ChatRequest,
    ChatResponse,
    ColdStart,
    ErrorDetail,
    ErrorInfo,
    ErrorResponse,
    GenerateRequest,
    GenerateResponse,
    HealthResponse,
    LoadModelResponse,
    LoadTimings,
    ModelInfoResponse,
    Usage,
)

logger = logging.getLogger(__name__)

STATUS_BY_ERROR: dict[type[LLMFunctionError], int] = {
    InvalidRequestError: 422,
    ContextLengthExceededError: 413,
    ModelNotLoadedError: 503,
    ModelLoadInProgressError: 409,
    ModelLoadError: 400,
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 409, 413, 422, 429, 500, 503)
}


def get_manager(request: Request) -> ModelManager:
    engine: ModelManager = request.app.state.engine
    return engine


EngineDep = Annotated[ModelManager, Depends(get_manager)]


def gigabytes(num_bytes: float) -> str:
    """The original guide's memory format: "3.45 GB"."""
    return f"{num_bytes / 1024**3:.2f} GB"


def human_size(num_bytes: float) -> str:
    return gigabytes(num_bytes) if num_bytes >= 1024**3 else f"{num_bytes / 1024**2:.2f} MB"


def error_response(
    status: int,
    code: str,
    message: str,
    details: list[ErrorDetail] | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(code=code, message=message, status=status, details=details or []))
    return JSONResponse(status_code=status, content=body.model_dump(), headers=headers)


def _field_name(location: tuple[Any, ...] | list[Any]) -> str:
    parts = [str(part) for part in location if part not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def _validation_detail(error: dict[str, Any]) -> ErrorDetail:
    context = error.get("ctx") or {}
    limit = next(
        (context[key] for key in ("le", "ge", "lt", "gt", "max_length", "min_length") if key in context), None
    )
    message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
    return ErrorDetail(
        field=_field_name(error.get("loc", ())),
        message=message,
        limit=limit if isinstance(limit, int | float | str) else None,
    )


def install_error_handlers(app: FastAPI) -> None:
    """Every error, ours or the framework's, leaves as `ErrorResponse`; 500 is kept for bugs."""

    @app.exception_handler(LLMFunctionError)
    async def on_domain_error(_: Request, exc: LLMFunctionError) -> JSONResponse:
        status = next((code for kind, code in STATUS_BY_ERROR.items() if isinstance(exc, kind)), 500)
        detail = ErrorDetail(field=exc.field, message=exc.message, limit=exc.limit)
        headers = {"Retry-After": "5"} if status == 503 else None
        return error_response(status, exc.code, exc.message, [detail], headers)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = list(exc.errors())
        if any(error.get("type") == "json_invalid" for error in errors):
            return error_response(
                400,
                "invalid_json",
                "the request body is not valid JSON",
                [ErrorDetail(field="body", message="malformed JSON")],
            )
        details = [_validation_detail(error) for error in errors]
        summary = "; ".join(f"{d.field}: {d.message}" for d in details)
        return error_response(422, "invalid_request", summary, details)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def on_bug(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error")
        return error_response(500, "internal_error", "internal error; the server log has the details")


def create_app(settings: Settings | None = None, engine: ModelManager | None = None) -> FastAPI:
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
    install_error_handlers(app)
    _mark_cold_response(app)
    _add_routes(app)
    return app


def _mark_cold_response(app: FastAPI) -> None:
    """`X-Cold-Start: true` on the first response of this process (environment), `false` after."""
    responses = itertools.count()

    @app.middleware("http")
    async def cold_start_header(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        response.headers["X-Cold-Start"] = "true" if next(responses) == 0 else "false"
        return response


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

    @app.post("/generate", response_model=GenerateResponse)
    def generate(request: GenerateRequest, engine: EngineDep) -> GenerateResponse:
        params = request.sampling_params(engine.settings.max_new_tokens)
        result = engine.generate(request.prompt, params)
        return GenerateResponse(
            generated_text=[request.prompt + text for text in result.continuations],
            prompt=request.prompt,
            model_name=result.model_name,
            generation_time=result.generation_time,
            finish_reason=result.finish_reasons,
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        )

    @app.post("/chat", response_model=ChatResponse)
    def chat(request: ChatRequest, engine: EngineDep) -> ChatResponse:
        params = request.sampling_params(engine.settings.max_new_tokens)
        result = engine.chat(request.instruction, request.input, params)
        return ChatResponse(
            response=result.continuations[0].strip(),
            instruction=request.instruction,
            model_name=result.model_name,
            generation_time=result.generation_time,
            finish_reason=result.finish_reasons[0],
            usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
        )

    @app.get("/model_info", response_model=ModelInfoResponse)
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

    @app.post("/load_model", response_model=LoadModelResponse)
    def load_model(
        engine: EngineDep,
        model_path: Annotated[
            str, Query(min_length=1, description="Local directory (s3:// in Lambda builds).")
        ],
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
    ) -> LoadModelResponse:
        quantization = quantization_from_flags(load_in_8bit, load_in_4bit)
        new, previous = engine.load(model_path, quantization)
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
