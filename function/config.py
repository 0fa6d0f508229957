"""Settings: the only reader of environment variables and the `.env` file.

An explicit argument (a CLI flag, a keyword to `Settings(...)`) beats an environment variable,
which beats a `.env` entry, which beats the default below.
"""

from __future__ import annotations

import os
import re
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[list[str], NoDecode]
NamedPaths = Annotated[dict[str, str], NoDecode]
MAX_THREADS = 256  # torch intra-op threads: TORCH_THREADS and OMP_NUM_THREADS are bounded by it
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

DEFAULT_INSTRUCTION_TEMPLATE = "### Instruction:\n{instruction}\n\n### Response:\n"
DEFAULT_INSTRUCTION_INPUT_TEMPLATE = (
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)


class Settings(BaseSettings):
    """Every knob of the service. Field names map to upper-case environment variables."""

    model_config = SettingsConfigDict(env_file=".env", env_file_encoding="utf-8", extra="ignore")

    # The original guide's variables.
    model_path: str | None = Field(
        default=None, description="Model to serve at start: a local directory, or s3://bucket/prefix."
    )
    load_in_8bit: bool = False
    load_in_4bit: bool = False
    base_model_path: str | None = Field(
        default=None,
        description="When MODEL_PATH is a PEFT adapter: its base model (a local directory or s3://); "
        "default: the adapter config's base_model_name_or_path when that is a directory or s3:// URI.",
    )
    adapters: NamedPaths = Field(
        default_factory=dict,
        description="LoRA adapters served beside the MODEL_PATH base, chosen per request: "
        "name=path,name2=path2 (local directories or s3://).",
    )

    # Limits a request is checked against.
    max_new_tokens: int = Field(default=1024, ge=1, description="Upper bound for a request's max_new_tokens.")
    max_num_return_sequences: int = Field(default=4, ge=1)

    # Engine.
    cpu_dtype: Literal["auto", "float32", "bfloat16"] = Field(
        default="auto",
        description="dtype on CPU. auto: bfloat16 when the CPU has native bf16 (avx512_bf16, amx_bf16) and "
        "the model is big enough for it to be faster (cpu_bf16_min_parameters), else float32. /model_info "
        "says which and why.",
    )
    cpu_bf16_min_parameters: int = Field(
        default=8_000_000,
        ge=0,
        description="With cpu_dtype=auto, models below this size stay float32 (bf16 measured slower there).",
    )
    torch_threads: int | None = Field(
        default=None,
        ge=1,
        le=MAX_THREADS,
        description="torch's intra-op threads. Default: OMP_NUM_THREADS when set; else on Lambda the vCPUs "
        "its memory size gives (1,769 MB each, up to 6); else the physical cores this process may run on.",
    )
    omp_num_threads: str | None = Field(
        default=None,
        description='The standard OpenMP variable: its first number counts ("4,2" nests; 4 is ours), '
        f"capped at {MAX_THREADS}; anything else is ignored.",
    )
    model_cache_dir: Path = Field(
        default=Path(tempfile.gettempdir()) / "llm-function" / "models",
        description="Where s3:// models are cached (on Lambda: under /tmp, sized by ephemeral storage).",
    )
    weights_in_memory: Literal["auto", "true", "false"] = Field(
        default="auto",
        description="s3:// weights straight into memory, never written to disk (true), or through the "
        "model_cache_dir cache (false). auto: memory under Lambda SnapStart (its /tmp is at most 512 MB and "
        "the snapshot holds the memory anyway), the disk cache elsewhere (it survives environment resets).",
    )
    warm_up: Literal["auto", "true", "false"] = Field(
        default="auto",
        description="One short generation right after the start-up model loads, so the first request "
        "does not pay for first-call work. auto: in server mode and in a SnapStart INIT (before the "
        "snapshot), not in an on-demand Lambda INIT, whose 10 s limit it would bring closer.",
    )
    aws_lambda_initialization_type: str | None = Field(
        default=None,
        description="Set by Lambda: 'snap-start' while a SnapStart version's INIT runs, 'on-demand' else.",
    )
    response_cache_size: int = Field(
        default=256,
        ge=0,
        description="Completions kept for deterministic requests (greedy or seeded); 0 disables.",
    )
    batch_max_size: int = Field(
        default=8,
        ge=1,
        description="Server mode: concurrent /generate, /chat and non-streamed /v1 requests generated "
        "together, at most this many per batch; 1 disables micro-batching. Off on Lambda (one request per "
        "environment).",
    )
    batch_window_ms: float = Field(
        default=10.0,
        ge=0,
        le=1000,
        description="How long a batch waits for the next request to join it; each arrival extends the wait "
        "by this much, up to four windows from the first request.",
    )
    batch_reduced_precision: bool = Field(
        default=False,
        description="Batch greedy requests on bf16/fp16, quantized or GPU models too, where our decoder did "
        "not measure batched rows bitwise as alone at load. Off by default: there rounding depends on the "
        "batch's shape, and a greedy answer could differ from the unbatched one where two tokens nearly "
        "tie. Sampled requests without a seed batch regardless.",
    )
    decoder: Literal["auto", "transformers"] = Field(
        default="auto",
        description="auto: on CPU, Llama-family models (llama, mistral, qwen2) decode with our own forward "
        "pass and oneDNN-packed linear layers (docs/benchmarks.md: about 3x transformers' generate); other "
        "models, GPUs, per-request adapters and TORCH_COMPILE use transformers. transformers: always "
        "transformers' generate. /model_info says which and why.",
    )
    pack_tied_output: Literal["auto", "true", "false"] = Field(
        default="auto",
        description="Our decoder: pack a tied output layer (one sharing the input embedding's weight, as "
        "SmolLM2's and Llama-3.2's) like the other layers, in oneDNN's layout (which our own matmul reads "
        "where the CPU has AVX-512 BF16), holding that weight twice (on the example model, +56 MB for a call "
        "of 0.66 instead of 0.78 ms at one row, 0.84 instead of 1.89 at eight). auto: in server mode where "
        "the copy takes at most a quarter of the memory available after the load; not on Lambda, where it "
        "would raise the INIT's memory peak. /model_info's decoder_reason says which.",
    )
    native_step: Literal["auto", "false"] = Field(
        default="auto",
        description="Our decoder: step a token's layers, and prefill prompts of up to 128 tokens, in C++ "
        "(function/engine/native_step.cpp: the same matmuls, our own loops between them; 1.3-1.8x a step "
        "on the example model; our own bf16 matmuls too where the CPU has AVX-512 BF16, with a batcher or "
        "without) where `python -m function build-native` built it for this torch and "
        "Python; else in Python. false: always Python. /model_info's decoder_reason says which, and why not.",
    )
    prompt_lookup_tokens: int = Field(
        default=3,
        ge=0,
        le=16,
        description="Our decoder: a greedy request drafts up to this many tokens a step from its own "
        "prompt and output (where its last 3 or 2 tokens occurred before, the tokens that followed), and "
        "checks them in one step of the model: the same answer, 1 to 1+N tokens a step "
        "(function/engine/speculation.py). A repetition penalty applies to each drafted token in its own "
        "context; sampled requests do not draft. Off where a step's rows are not known to decode bitwise "
        "as alone (float32 in server mode, or a failed measurement). 0: off.",
    )
    torch_compile: bool = Field(
        default=False,
        description="Server mode: decode with a static KV cache and a torch.compile'd forward. Each new "
        "batch size and length compiles first (tens of seconds); faster after (see docs/benchmarks.md). "
        "Ignored on Lambda: the compile would land on the cold path.",
    )
    load_retry_interval_s: float = Field(
        default=5.0,
        ge=0,
        description="After a failed start-up load, wait this long before a request retries.",
    )

    # /chat prompt format when the tokenizer has no chat template.
    use_chat_template: bool = Field(
        default=True, description="Use the tokenizer's chat template when present."
    )
    instruction_template: str = DEFAULT_INSTRUCTION_TEMPLATE
    instruction_input_template: str = DEFAULT_INSTRUCTION_INPUT_TEMPLATE

    log_level: str = "INFO"

    # Security. Keys guard every route but /health and the docs; with none set the API is open
    # (local development) and a warning is logged once.
    api_keys: CommaList = Field(
        default_factory=list, description="Comma-separated keys for inference routes."
    )
    admin_api_keys: CommaList = Field(
        default_factory=list, description="Comma-separated keys for /load_model."
    )
    api_keys_secret_arn: str | None = Field(
        default=None,
        description='Secrets Manager secret holding {"api_keys": …, "admin_api_keys": …}, read once at init.',
    )
    allowed_model_paths: CommaList = Field(
        default_factory=list,
        description="Directories and s3:// prefixes /load_model may load from; default: MODEL_PATH's parent.",
    )
    allow_runtime_model_load: bool = Field(
        default=False, description="On Lambda, allow /load_model (it changes one execution environment only)."
    )
    max_request_bytes: int = Field(
        default=1_048_576, ge=1024, description="Request bodies above this get 413."
    )
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, description="Prompt token cap; default: context."
    )
    max_stop_string_chars: int = Field(
        default=200, ge=1, description="Longest stop string, in characters (each is also capped in tokens)."
    )
    max_stop_total_chars: int = Field(
        default=400, ge=1, description="All of a request's stop strings together, in characters."
    )
    max_stop_string_tokens: int = Field(
        default=32, ge=1, description="Longest stop string, in tokens of the served model's tokenizer."
    )
    max_messages: int = Field(default=256, ge=1, description="Messages in one /v1/chat/completions request.")
    max_header_bytes: int = Field(
        default=16_384, ge=1024, description="Request header block cap, in bytes (431 above it)."
    )
    max_queued_requests: int | None = Field(
        default=None,
        ge=1,
        description="Server mode: generation requests admitted at once (running or waiting); past it, 503 "
        "with Retry-After at once. Default: 4 × BATCH_MAX_SIZE, at least 32.",
    )
    max_model_parameters: int = Field(
        default=100_000_000_000,
        ge=1,
        description="A model whose checkpoint holds more parameters is refused before anything is allocated.",
    )
    max_context_length: int = Field(
        default=1_048_576,
        ge=1,
        description="A config claiming a longer context is refused (it would turn the context check off).",
    )
    rate_limit: str | None = Field(
        default="120/minute",
        description="Per key (or client address when open), server mode only; empty disables.",
    )
    # Set by the Lambda runtime: tells the code it runs on Lambda.
    aws_lambda_function_name: str | None = None
    aws_lambda_function_memory_size: int | None = Field(
        default=None, ge=1, description="Set by Lambda: the function's memory in MB (its vCPUs follow it)."
    )

    @field_validator("api_keys", "admin_api_keys", "allowed_model_paths", mode="before")
    @classmethod
    def _split_commas(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("adapters", mode="before")
    @classmethod
    def _named_paths(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        pairs: dict[str, str] = {}
        for item in (part.strip() for part in value.split(",")):
            if not item:
                continue
            name, sep, path = item.partition("=")
            if not sep or not name.strip() or not path.strip():
                raise ValueError(f"ADAPTERS entries are name=path; got {item!r}")
            pairs[name.strip()] = path.strip()
        return pairs

    @field_validator("adapters")
    @classmethod
    def _adapter_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ADAPTER_NAME.match(name):
                raise ValueError(
                    f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (at most 64 characters)"
                )
        return value

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    @property
    def on_lambda(self) -> bool:
        return bool(self.aws_lambda_function_name)

    @property
    def snap_start(self) -> bool:
        """This INIT is a SnapStart one: it ends in a snapshot that restored environments share."""
        return self.aws_lambda_initialization_type == "snap-start"

    @property
    def warms_up(self) -> bool:
        """WARM_UP, with auto resolved."""
        if self.warm_up != "auto":
            return self.warm_up == "true"
        return not self.on_lambda or self.snap_start

    @property
    def fetch_into_memory(self) -> bool:
        """WEIGHTS_IN_MEMORY, with auto resolved (memory under SnapStart)."""
        return self.weights_in_memory == "true" or (self.weights_in_memory == "auto" and self.snap_start)

    @property
    def queue_limit(self) -> int:
        """MAX_QUEUED_REQUESTS, or four batches' worth of requests and at least 32 (with micro-batching
        off, BATCH_MAX_SIZE=1, four requests would shed a handful of ordinary clients)."""
        return self.max_queued_requests or max(32, 4 * self.batch_max_size)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys or self.admin_api_keys)

    @model_validator(mode="after")
    def _one_quantization(self) -> Settings:
        if self.load_in_8bit and self.load_in_4bit:
            raise ValueError("LOAD_IN_8BIT and LOAD_IN_4BIT are exclusive: set at most one")
        for name in ("instruction_template", "instruction_input_template"):
            if "{instruction}" not in getattr(self, name):
                raise ValueError(f"{name.upper()} must contain the {{instruction}} placeholder")
        if "{input}" not in self.instruction_input_template:
            raise ValueError("INSTRUCTION_INPUT_TEMPLATE must contain the {input} placeholder")
        return self

    def export_to_environment(self) -> None:
        """Hand the settings to a child process (uvicorn --reload re-imports the app) via the environment."""
        if self.model_path is not None:
            os.environ["MODEL_PATH"] = self.model_path
        if self.base_model_path is not None:
            os.environ["BASE_MODEL_PATH"] = self.base_model_path
        os.environ["LOAD_IN_8BIT"] = str(self.load_in_8bit).lower()
        os.environ["LOAD_IN_4BIT"] = str(self.load_in_4bit).lower()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return Settings()


def enforce_hub_offline() -> None:
    """No model hub at run time: set before huggingface_hub is imported, so it reads it."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
