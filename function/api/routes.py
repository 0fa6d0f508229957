"""The original server guide's routes: /health, /generate, /chat, /model_info, /load_model.

Thin: each turns its request into engine calls and the engine's results into its response.

Generation routes are `async`: the engine call runs in a worker thread of their own pool
(`generation_threads`), admitted first (`Engine.admit`: 503 past the limit), while the route waits
on the request's receive channel for the client to hang up and then cancels the generation (it
stops at its next token). /health answers on the event loop from the engine's status: it never waits
for a thread or a lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Generic, TypeVar

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from function.api.dependencies import EngineDep, admin_access, current_engine, user_access
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
from function.engine.types import Cancellation
from function.weights.loading import quantization_from_flags

router = APIRouter()
UNHEALTHY_HEADERS = {"Retry-After": "5"}  # /health's 503: a load may be under way
DISCONNECT_POLL_S = 0.05  # the receive channel should only ever say "disconnect" here; never spin on it
T = TypeVar("T")
MAX_PATH_CHARS = 4096  # /load_model's paths: PATH_MAX on Linux


def generation_threads(request: Request, engine: Engine) -> anyio.CapacityLimiter:
    """The worker threads engine calls run in, apart from the pool of sync dependencies and routes: an
    admitted request never waits for a thread, and generation never holds one a key check or /metrics
    needs. Twice the admission limit: a cancelled stream's thread may still be finishing its token."""
    state = request.app.state
    limiter: anyio.CapacityLimiter | None = getattr(state, "generation_threads", None)
    if limiter is None:
        limiter = state.generation_threads = anyio.CapacityLimiter(2 * engine.settings.queue_limit)
    return limiter


async def watch_disconnect(request: Request, cancel: Cancellation) -> None:
    """Cancel when the client hangs up. The body is read by now, so the receive channel's next message is
    the server's `http.disconnect`, delivered the moment the socket closes. (Polling Starlette's
    `request.is_disconnected()` instead never saw it through this app's middleware stack.)"""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            cancel.cancel()
            return
        await anyio.sleep(DISCONNECT_POLL_S)


class _Outcome(Generic[T]):
    """A worker thread's result or exception, carried out of the task group unwrapped."""

    def __init__(self, call: Callable[[Cancellation], T], cancel: Cancellation) -> None:
        self.value: T | None = None
        self.error: Exception | None = None
        try:
            self.value = call(cancel)
        except Exception as exc:
            self.error = exc

    def unwrap(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]  # set whenever error is None


async def run_cancellable(
    request: Request, call: Callable[[Cancellation], T], cancel: Cancellation, threads: anyio.CapacityLimiter
) -> T:
    """`call(cancel)` in a worker thread; `cancel` is set if the client hangs up meanwhile."""
    async with anyio.create_task_group() as group:
        group.start_soon(watch_disconnect, request, cancel)
        outcome = await anyio.to_thread.run_sync(_Outcome, call, cancel, limiter=threads)
        group.cancel_scope.cancel()
    return outcome.unwrap()


async def run_admitted(request: Request, engine: Engine, call: Callable[[Cancellation], T]) -> T:
    """A generation request's engine call: admitted (OverloadedError past the limit), run in a worker
    thread, cancelled when the client hangs up (the engine then raises ClientClosedRequestError, which
    leaves as a 499 that only the log line and metrics see). Its place is given back when it ends."""
    with engine.admit():
        return await run_cancellable(request, call, Cancellation(), generation_threads(request, engine))


def gigabytes(num_bytes: float) -> str:
    """The original guide's memory format: "3.45 GB"."""
    return f"{num_bytes / 1024**3:.2f} GB"


def human_size(num_bytes: float) -> str:
    return gigabytes(num_bytes) if num_bytes >= 1024**3 else f"{num_bytes / 1024**2:.2f} MB"


@router.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
async def health(request: Request) -> Any:
    status_code, body = await health_report(current_engine(request))
    if status_code == 200:
        return body
    return JSONResponse(status_code=status_code, content=body.model_dump(), headers=UNHEALTHY_HEADERS)


@router.head("/health", include_in_schema=False)
async def health_head(request: Request) -> Response:
    """GET's status without the body, for probes that send HEAD (load balancers, uptime checks)."""
    status_code, _ = await health_report(current_engine(request))
    return Response(status_code=status_code, headers=UNHEALTHY_HEADERS if status_code != 200 else None)


async def health_report(engine: Engine) -> tuple[int, HealthResponse]:
    """/health's status code and body: 200 when the model is loaded, 503 with the reason otherwise.

    On the event loop, without a thread or a lock: it answers at once however busy the engine is. In
    server mode a due retry of a failed start-up load starts in the background ("loading" until it is
    done); on Lambda, where one request runs per environment and a background thread would be frozen
    between invocations, the retry runs before the answer, in a worker thread."""
    if engine.settings.on_lambda:
        await anyio.to_thread.run_sync(engine.ensure_loaded)
    else:
        engine.ensure_loaded_in_background()
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
async def generate(body: GenerateRequest, request: Request, engine: EngineDep) -> GenerateResponse:
    params = body.sampling_params(engine.settings.max_new_tokens)
    result = await run_admitted(request, engine, lambda cancel: engine.generate(body.prompt, params, cancel))
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
async def chat(body: ChatRequest, request: Request, engine: EngineDep) -> ChatResponse:
    params = body.sampling_params(engine.settings.max_new_tokens)
    result = await run_admitted(
        request, engine, lambda cancel: engine.chat(body.instruction, body.input, params, cancel)
    )
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
        dtype_reason=loaded.dtype_reason,
        quantization=loaded.quantization,
        quantization_backend=loaded.quantization_backend,
        threads=loaded.threads,
        decoder="ours" if loaded.decoder is not None else "transformers",
        decoder_reason=loaded.decoder_reason,
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
            max_length=MAX_PATH_CHARS,
            description="A model directory or s3:// prefix, or a PEFT adapter's (merged into its base).",
        ),
    ],
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    base_model_path: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=MAX_PATH_CHARS,
            description="An adapter's base; default: the base its adapter_config.json names.",
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
