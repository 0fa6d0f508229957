"""The original server guide's routes: /health, /generate, /chat, /model_info, /load_model.

Thin: each turns its request into engine calls and the engine's results into its response.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from function.api.dependencies import EngineDep, admin_access, user_access
from function.api.observability import record_generation
from function.api.schemas import (
    AdapterInfo,
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
from function.engine.engine import Engine
from function.weights.loading import quantization_from_flags

router = APIRouter()
UNHEALTHY_HEADERS = {"Retry-After": "5"}  # /health's 503: a load may be under way


def gigabytes(num_bytes: float) -> str:
    """The original guide's memory format: "3.45 GB"."""
    return f"{num_bytes / 1024**3:.2f} GB"


def human_size(num_bytes: float) -> str:
    return gigabytes(num_bytes) if num_bytes >= 1024**3 else f"{num_bytes / 1024**2:.2f} MB"


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
def health(engine: EngineDep) -> Any:
    status_code, body = health_report(engine)
    if status_code == 200:
        return body
    return JSONResponse(status_code=status_code, content=body.model_dump(), headers=UNHEALTHY_HEADERS)


@router.head("/health", include_in_schema=False)
def health_head(engine: EngineDep) -> Response:
    """GET's status without the body, for probes that send HEAD (load balancers, uptime checks)."""
    status_code, _ = health_report(engine)
    return Response(status_code=status_code, headers=UNHEALTHY_HEADERS if status_code != 200 else None)


def health_report(engine: Engine) -> tuple[int, HealthResponse]:
    """/health's status code and body: 200 when the model is loaded, 503 with the reason otherwise."""
    engine.ensure_loaded()
    status = engine.status()
    body = HealthResponse(
        status=status.state,
        model_loaded=status.state == "healthy",
        model_name=status.model_name,
        device=status.device,
        reason=status.reason,
    )
    return (200 if status.state == "healthy" else 503), body


@router.post("/generate", response_model=GenerateResponse, dependencies=[Depends(user_access)])
def generate(body: GenerateRequest, request: Request, engine: EngineDep) -> GenerateResponse:
    params = body.sampling_params(engine.settings.max_new_tokens)
    result = engine.generate(body.prompt, params)
    record_generation(request, result)
    return GenerateResponse(
        generated_text=[body.prompt + text for text in result.continuations],
        prompt=body.prompt,
        model_name=result.model_name,
        generation_time=result.generation_time,
        finish_reason=result.finish_reasons,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
    )


@router.post("/chat", response_model=ChatResponse, dependencies=[Depends(user_access)])
def chat(body: ChatRequest, request: Request, engine: EngineDep) -> ChatResponse:
    params = body.sampling_params(engine.settings.max_new_tokens)
    result = engine.chat(body.instruction, body.input, params)
    record_generation(request, result)
    return ChatResponse(
        response=result.continuations[0].strip(),
        instruction=body.instruction,
        model_name=result.model_name,
        generation_time=result.generation_time,
        finish_reason=result.finish_reasons[0],
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens),
    )


@router.get("/model_info", response_model=ModelInfoResponse, dependencies=[Depends(user_access)])
def model_info(engine: EngineDep) -> ModelInfoResponse:
    loaded = engine.require_model()
    allocated, reserved, note = device_memory(loaded.device)
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
        base_model_path=loaded.base_path,
        adapter=AdapterInfo(name=loaded.adapter, merged=loaded.adapter_merged) if loaded.adapter else None,
        adapters=list(loaded.adapters),
        cold_start=ColdStart(**phases) if (phases := engine.cold_start()) else None,
    )


@router.post("/load_model", response_model=LoadModelResponse, dependencies=[Depends(admin_access)])
def load_model(
    engine: EngineDep,
    model_path: Annotated[
        str,
        Query(
            min_length=1,
            description="A model directory or s3:// prefix, or a PEFT adapter's (merged into its base).",
        ),
    ],
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    base_model_path: Annotated[
        str | None,
        Query(
            min_length=1, description="An adapter's base; default: the base its adapter_config.json names."
        ),
    ] = None,
) -> LoadModelResponse:
    quantization = quantization_from_flags(load_in_8bit, load_in_4bit)
    new, previous = engine.load_requested(model_path, quantization, base_model_path)
    return LoadModelResponse(
        status="loaded",
        model_name=new.name,
        model_path=new.path,
        device=new.device,
        quantization=new.quantization,
        load_time=round(new.load_seconds, 4),
        previous_model_name=previous.name if previous else None,
    )


def device_memory(device: str) -> tuple[str, str, str]:
    """The guide's GPU memory figures (allocated, reserved) and what they mean on this device."""
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
