"""Request and response models of the guide's routes, and the error body of our route family.

Field names and defaults are the original server guide's; additions are optional and never
change those shapes. Bounds that depend on settings (max_new_tokens, num_return_sequences)
are checked in `function.engine.limits.validate_limits`, so the server's limit is named in the error.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from function.engine.types import (
    FinishReason,
    HealthState,
    Quantization,
    QuantizationBackend,
    SamplingParams,
)


def _not_blank(value: str) -> str:
    if not _NOT_SPACE.search(value):
        raise ValueError("must not be empty or only whitespace")
    return value


# Code points U+D800..U+DFFF: half of a UTF-16 pair. A JSON "\ud800" escape without its other half
# decodes to one; no tokenizer (and no UTF-8 encoder) accepts it.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_unicode(value: object) -> object:
    """Before pydantic's own str check, which would refuse it as "unable to parse raw data" (or, without
    a length bound, let it through to the tokenizer: a 500)."""
    if isinstance(value, str) and _LONE_SURROGATE.search(value):
        raise ValueError(
            "must be valid Unicode: it contains a lone surrogate (a \\ud800-\\udfff escape without its pair)"
        )
    return value


def _json_number(value: object) -> object:
    """JSON numbers only: no booleans and no numeric strings (pydantic's lax mode would coerce them)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("must be a JSON number")
    return value


Int = Annotated[int, BeforeValidator(_json_number)]  # 3 and 3.0 (JSON Schema's integer), not "3" or true
Float = Annotated[float, BeforeValidator(_json_number)]
Bool = Annotated[bool, Field(strict=True)]
# Bounds inside the validator, or pydantic writes them to the schema as raw "ge"/"le" keys.
PositiveInt = Annotated[Annotated[int, Field(ge=1)], BeforeValidator(_json_number)]
Seed = Annotated[Annotated[int, Field(ge=0, le=2**32 - 1)], BeforeValidator(_json_number)]
# The schema says "at least one non-whitespace character"; the check uses the same (Python re) semantics.
_NOT_SPACE = re.compile(r"\S")
# Every text field refuses lone surrogates. Texts are bounded by MAX_REQUEST_BYTES (and prompts by the
# token caps); names and lists have static caps here.
Text = Annotated[str, BeforeValidator(valid_unicode)]
NonEmptyText = Annotated[
    str,
    Field(min_length=1, json_schema_extra={"pattern": r"\S"}),
    AfterValidator(_not_blank),
    BeforeValidator(valid_unicode),
]
AdapterName = Annotated[str, Field(min_length=1, max_length=64), BeforeValidator(valid_unicode)]
ChosenAdapter = Annotated[
    AdapterName | None,
    Field(description="A LoRA adapter served beside the base (ADAPTERS); default: the base model."),
]
MAX_STOP_STRINGS = 4
StopString = Annotated[str, Field(min_length=1), BeforeValidator(valid_unicode)]
StopStrings = Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)]


class GenerateRequest(BaseModel):
    # The guide's request body for /generate, then its curl example: what "Try it out" pre-fills.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "prompt": "Python이란 무엇인가요?",
                    "max_new_tokens": 256,
                    "temperature": 0.7,
                    "top_p": 0.9,
                    "top_k": 50,
                    "repetition_penalty": 1.1,
                    "do_sample": True,
                    "num_return_sequences": 1,
                },
                {"prompt": "Python이란?", "max_new_tokens": 100, "temperature": 0.7},
            ]
        },
    )

    prompt: NonEmptyText
    max_new_tokens: Int = Field(default=256, ge=1)
    temperature: Float = Field(default=0.7, ge=0, description="0 means greedy decoding.")
    top_p: Float = Field(default=0.9, gt=0, le=1)
    top_k: Int = Field(default=50, ge=0, description="0 disables top-k filtering.")
    repetition_penalty: Float = Field(default=1.1, gt=0)
    do_sample: Bool = True
    num_return_sequences: Int = Field(default=1, ge=1)
    stop: StopStrings | None = Field(
        default=None, description="Up to 4 strings; generation stops before the first one produced."
    )
    seed: Seed | None = Field(default=None, description="Makes sampling reproducible.")
    adapter: ChosenAdapter = None

    def sampling_params(self, max_new_tokens_limit: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=_max_new_tokens(self, max_new_tokens_limit),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            do_sample=self.do_sample,
            num_return_sequences=self.num_return_sequences,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            adapter=self.adapter,
        )


class ChatRequest(BaseModel):
    # The guide's request body for /chat, then its curl example.
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "instruction": "Python에서 리스트를 정렬하는 방법을 알려주세요",
                    "input": "",
                    "max_new_tokens": 256,
                    "temperature": 0.7,
                    "top_p": 0.9,
                },
                {"instruction": "머신러닝을 설명하세요", "max_new_tokens": 150},
            ]
        },
    )

    instruction: NonEmptyText
    input: Text = ""
    max_new_tokens: Int = Field(default=256, ge=1)
    temperature: Float = Field(default=0.7, ge=0, description="0 means greedy decoding.")
    top_p: Float = Field(default=0.9, gt=0, le=1)
    stop: StopStrings | None = None
    seed: Seed | None = None
    adapter: ChosenAdapter = None

    def sampling_params(self, max_new_tokens_limit: int) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=_max_new_tokens(self, max_new_tokens_limit),
            temperature=self.temperature,
            top_p=self.top_p,
            stop=tuple(self.stop or ()),
            seed=self.seed,
            adapter=self.adapter,
        )


def _max_new_tokens(request: GenerateRequest | ChatRequest, limit: int) -> int:
    """The user's value when given (checked against the limit later), else the default capped by it."""
    if "max_new_tokens" in request.model_fields_set:
        return request.max_new_tokens
    return min(request.max_new_tokens, limit)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    generated_text: list[str] = Field(description="Prompt + continuation, one per returned sequence.")
    prompt: str
    model_name: str
    generation_time: float = Field(description="Seconds spent generating.")
    finish_reason: list[FinishReason] = Field(description="One per returned sequence.")
    usage: Usage


class ChatResponse(BaseModel):
    response: str = Field(description="The continuation only, trimmed.")
    instruction: str
    model_name: str
    generation_time: float
    finish_reason: FinishReason
    usage: Usage


class HealthResponse(BaseModel):
    status: HealthState
    model_loaded: bool
    model_name: str | None
    device: str
    reason: str | None = Field(default=None, description="Why the service is not healthy.")


class LoadTimings(BaseModel):
    resolve_s: float = Field(description="Finding (later: fetching) the weights.")
    load_s: float = Field(description="from_pretrained of the tokenizer and the model.")
    total_s: float


class ColdStart(BaseModel):
    """Start-up phases of this process (an execution environment on Lambda)."""

    imports_s: float | None = Field(description="Importing the app, torch and transformers (Lambda entry).")
    rss_after_imports_mb: float | None = Field(
        description="Resident memory once imports were done (with WEIGHTS_IN_MEMORY it includes the weights "
        "fetched so far: the fetch runs during the imports)."
    )
    ready_s: float | None = Field(
        description="From the entry point's start to the model ready (phases overlap)."
    )
    fetch_s: float = Field(
        description="Resolving MODEL_PATH: the S3 download, or checking a local directory."
    )
    fetch_bytes: int = Field(description="Bytes downloaded (0 when the /tmp cache was reused).")
    fetch_mb_per_s: float | None
    fetch_from_cache: bool | None = Field(description="True when unchanged weights were found in /tmp.")
    load_s: float = Field(description="from_pretrained of the tokenizer and the model.")
    fetch_in_memory: bool | None = Field(
        default=None,
        description="The s3:// weights went straight into memory (WEIGHTS_IN_MEMORY), not to /tmp.",
    )
    warm_up_s: float | None = Field(
        default=None,
        description="The warm-up generation after the load (WARM_UP); under SnapStart, in the INIT.",
    )
    restored: bool = Field(
        default=False,
        description="This environment resumed from a SnapStart snapshot: the phases above are the INIT's.",
    )
    restore_s: float | None = Field(default=None, description="The after-restore hooks (SnapStart).")
    snapshot_age_s: float | None = Field(
        default=None, description="Time from the snapshot to this restore (SnapStart)."
    )
    first_token_s: float | None = Field(
        description="First token of the first request, once there was one (after the restore, if restored)."
    )


class AdapterInfo(BaseModel):
    name: str
    merged: bool = Field(
        description="Merged into the base's weights (full precision), or kept apart (8/4-bit)."
    )


class ModelInfoResponse(BaseModel):
    model_name: str
    model_path: str
    device: str
    gpu_memory_allocated: str
    gpu_memory_reserved: str
    memory_note: str = Field(description="What the memory figures mean on this device.")
    model_memory: str = Field(description="Bytes held by the model's parameters and buffers.")
    dtype: str
    dtype_reason: str = Field(
        description="Why this dtype: CPU_DTYPE, or what auto found (the CPU, the model)."
    )
    quantization: Quantization
    quantization_backend: QuantizationBackend | None = Field(
        description="What runs load_in_8bit / load_in_4bit: torchao on CPU, bitsandbytes on CUDA; else null."
    )
    threads: int = Field(description="torch's intra-op CPU threads (TORCH_THREADS, or the vCPUs found).")
    decoder: Literal["ours", "transformers"] = Field(
        description="What decodes: ours (CPU, Llama-family; oneDNN-packed, fused matmuls) or "
        "transformers' generate."
    )
    decoder_reason: str = Field(description="Why that decoder (DECODER, the device, the model, adapters).")
    parameter_count: int
    context_length: int
    chat_template: bool = Field(description="Whether /chat uses the tokenizer's chat template.")
    load_timings: LoadTimings
    loaded_at: str
    base_model_path: str | None = Field(
        default=None, description="The base model, when model_path is a PEFT adapter."
    )
    adapter: AdapterInfo | None = Field(
        default=None, description="model_path's adapter, when it is one: merged into the base, or not."
    )
    adapters: list[str] = Field(
        default_factory=list, description="LoRA adapters a request may choose (`adapter`, or `model` on /v1)."
    )
    cold_start: ColdStart | None = Field(
        description="Start-up phases; null when no start-up model was loaded."
    )


class LoadModelResponse(BaseModel):
    status: Literal["loaded"]
    model_name: str
    model_path: str
    device: str
    quantization: Quantization
    load_time: float
    previous_model_name: str | None


class ErrorDetail(BaseModel):
    field: str | None = Field(default=None, description="The offending field, dotted (e.g. max_new_tokens).")
    message: str
    limit: Any = Field(default=None, description="The bound that was crossed, when there is one.")


class ErrorInfo(BaseModel):
    code: str = Field(description="Stable machine-readable name, e.g. invalid_request.")
    message: str
    status: int
    details: list[ErrorDetail] = Field(default_factory=list)


class ErrorResponse(BaseModel):
    """The one body of every error response."""

    error: ErrorInfo
