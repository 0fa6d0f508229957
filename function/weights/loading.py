"""Load a tokenizer and model from resolved weights: device, dtype, quantization.

Always offline and safe: `local_files_only=True`, `trust_remote_code=False`, safetensors only.
"""

from __future__ import annotations

import importlib
import logging
import re
import time
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from function.config import Settings, enforce_hub_offline
from function.engine.types import Quantization, QuantizationBackend
from function.errors import InvalidRequestError, ModelLoadError
from function.weights.checkpoint import (
    check_checkpoint,
    config_context_length,
    loading_problem,
    read_checkpoint,
)
from function.weights.cpu import (
    DtypeChoice,
    choose_cpu_dtype,
    configure_threads,
    quiet_torchao_import,
)
from function.weights.cpu import (
    cpu_has_native_bf16 as cpu_has_native_bf16,  # re-exported: callers import it from here
)
from function.weights.fetcher import FetchResult
from function.weights.footprint import model_bytes
from function.weights.resolve import TOKENIZER_FILES
from function.weights.sources import ModelSources, PathCheck, resolve_sources

logger = logging.getLogger(__name__)
enforce_hub_offline()  # before transformers (imported inside the functions below) reads it
quiet_torchao_import()  # transformers imports torchao whenever it loads a model

# What loading a model imports. transformers imports most of these lazily on first use (about 2 s
# on the first from_pretrained); the Lambda entry imports them up front, while the weights download.
RUNTIME_MODULES = (
    "torch",
    "safetensors.torch",
    "transformers",
    "transformers.modeling_utils",
    "transformers.models.auto.configuration_auto",
    "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
    "transformers.generation.utils",
)
FALLBACK_CONTEXT_LENGTH = 2048


@dataclass(frozen=True)
class LoadedModel:
    """Everything one served model needs; immutable, swapped as a whole."""

    model: Any
    tokenizer: Any
    name: str
    path: str
    device: str
    dtype: str
    quantization: Quantization
    parameter_count: int
    context_length: int
    chat_template: bool
    resolve_seconds: float
    load_seconds: float
    loaded_at: datetime
    fetch: FetchResult | None = None
    adapters: tuple[str, ...] = ()  # chosen per request (ADAPTERS)
    adapter: str | None = None  # MODEL_PATH's adapter, applied to every request
    adapter_merged: bool = False  # ... merged into the base's weights
    base_path: str | None = None  # the base model, when MODEL_PATH is an adapter
    dtype_reason: str = ""  # why this dtype (CPU_DTYPE, the CPU, the model's width)
    quantization_backend: QuantizationBackend | None = None
    threads: int = 0  # torch's intra-op threads when it was loaded
    decoder: Any = None  # function.engine.decoder.Decoder, when ours decodes this model
    decoder_reason: str = ""  # which decoder, and why

    def memory_bytes(self) -> int:
        """What the parameters and buffers hold (quantized tensors by their real size)."""
        return model_bytes(self.model)


def import_runtime() -> None:
    """Import everything a model load needs, now rather than lazily inside the first load."""
    for name in RUNTIME_MODULES:
        importlib.import_module(name)


def quantization_from_flags(load_in_8bit: bool, load_in_4bit: bool) -> Quantization:
    if load_in_8bit and load_in_4bit:
        raise InvalidRequestError(
            "load_in_8bit and load_in_4bit are exclusive: ask for at most one", field="load_in_4bit"
        )
    return "8bit" if load_in_8bit else "4bit" if load_in_4bit else "none"


def quantization_backend(quantization: Quantization, device: str) -> QuantizationBackend | None:
    """8-bit and 4-bit run on torchao's CPU path on CPU (bitsandbytes' is measured slower there,
    docs/benchmarks.md), and on bitsandbytes on CUDA."""
    if quantization == "none":
        return None
    return "torchao" if device == "cpu" else "bitsandbytes"


def pick_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def choose_dtype(
    device: str, config: Any, parameters: int, settings: Settings, quantization: Quantization = "none"
) -> DtypeChoice:
    """CUDA: the checkpoint's half dtype. CPU: `choose_cpu_dtype` (float32 unless bfloat16 wins)."""
    import torch

    if device == "cuda":
        checkpoint_dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        if checkpoint_dtype in (torch.bfloat16, torch.float16):
            return DtypeChoice(checkpoint_dtype, f"{_name(checkpoint_dtype)}: the checkpoint's dtype")
        if torch.cuda.is_bf16_supported():
            return DtypeChoice(torch.bfloat16, "bfloat16: a float32 checkpoint, on a GPU with bfloat16")
        return DtypeChoice(torch.float16, "float16: a float32 checkpoint, on a GPU without bfloat16")
    return choose_cpu_dtype(
        parameters, settings, quantized=quantization != "none", model_type=getattr(config, "model_type", None)
    )


def _name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _quantization_config(quantization: Quantization, compute_dtype: Any, device: str) -> Any:
    backend = quantization_backend(quantization, device)
    if backend is None:
        return None
    if backend == "torchao":
        from function.weights.cpu_quantization import torchao_config

        return torchao_config(quantization)
    from transformers import BitsAndBytesConfig

    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_use_double_quant=True,
    )


def safe_reason(exc: BaseException, local_dir: Path) -> str:
    """An exception's text with local paths removed, short enough for an error body."""
    text = str(exc).replace(str(local_dir), "<model_path>")
    text = re.sub(r"(?<![\w<])/(?:[\w.\-]+/)*[\w.\-]+", "<path>", text)
    text = " ".join(text.split())
    return f"{type(exc).__name__}: {text[:300]}"


def _release_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _context_length(config: Any, tokenizer: Any, settings: Settings) -> int:
    claimed = config_context_length(config, settings)
    if claimed is not None:
        return claimed
    limit = getattr(tokenizer, "model_max_length", None)  # transformers' "no limit" is 1e30: ignored
    if isinstance(limit, int) and 0 < limit < min(10**7, settings.max_context_length + 1):
        return limit
    return FALLBACK_CONTEXT_LENGTH


def load_model(
    model_path: str,
    quantization: Quantization,
    settings: Settings,
    device: str,
    *,
    base_model_path: str | None = None,
    adapters: dict[str, str] | None = None,
    check_path: PathCheck | None = None,
) -> LoadedModel:
    """Resolve (the model, or an adapter and its base, and named adapters), then load tokenizer and
    model. Raises `ModelLoadError` with a client-safe reason."""
    sources = resolve_sources(
        model_path,
        settings.model_cache_dir,
        base_model_path=base_model_path,
        adapters=adapters,
        check_path=check_path,
        in_memory=settings.fetch_into_memory,
    )
    started = time.perf_counter()
    threads = configure_threads(settings)
    backend = quantization_backend(quantization, device)
    try:
        loaded = _from_pretrained(sources, quantization, settings, device)
        if backend == "torchao":  # transformers quantizes the linear layers; the embeddings are left
            from function.weights.cpu_quantization import quantize_embeddings

            quantize_embeddings(loaded[0], quantization)
    except ModelLoadError:
        raise
    except Exception as exc:  # transformers, torch and bitsandbytes raise many types; none may escape raw
        logger.exception("model load failed")
        if "OutOfMemoryError" in type(exc).__name__:
            _release_memory()
            raise ModelLoadError(
                "the new model does not fit in memory beside the one being served; the old "
                "model keeps serving (try load_in_8bit or load_in_4bit)",
                field="model_path",
            ) from exc
        raise ModelLoadError(
            "the model could not be loaded: " + safe_reason(exc, sources.base.local_dir), field="model_path"
        ) from exc
    load_seconds = time.perf_counter() - started
    model, tokenizer, choice, context_length, parameters, merged = loaded
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=sources.name,
        path=model_path,
        device=device,
        dtype=_name(choice.dtype),
        dtype_reason=choice.reason,
        quantization=quantization,
        quantization_backend=backend,
        threads=threads,
        parameter_count=parameters,
        context_length=context_length,
        chat_template=bool(settings.use_chat_template and getattr(tokenizer, "chat_template", None)),
        resolve_seconds=sources.seconds,
        load_seconds=load_seconds,
        loaded_at=datetime.now(UTC),
        fetch=sources.fetch(),
        adapters=tuple(sources.extra),
        adapter=sources.adapter.name if sources.adapter else None,
        adapter_merged=merged,
        base_path=sources.base.source if sources.adapter else None,
    )


def _tokenizer_dir(sources: ModelSources) -> Path:
    """An adapter that ships its own tokenizer (added tokens, a chat template) uses it; else the base's."""
    adapter = sources.adapter
    if adapter is not None and any((adapter.local_dir / name).is_file() for name in TOKENIZER_FILES):
        return adapter.local_dir
    return sources.base.local_dir


def _from_pretrained(
    sources: ModelSources, quantization: Quantization, settings: Settings, device: str
) -> tuple[Any, Any, Any, int, int, bool]:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from function.weights.adapters import attach_adapters
    from function.weights.memory import model_from_memory

    base_dir = sources.base.local_dir
    offline: dict[str, Any] = {"local_files_only": True, "trust_remote_code": False}
    config = AutoConfig.from_pretrained(base_dir, **offline)
    memory = sources.base.memory  # s3:// safetensors fetched into memory (WEIGHTS_IN_MEMORY)
    checkpoint = memory.checkpoint() if memory is not None else read_checkpoint(base_dir)  # headers only
    check_checkpoint(config, checkpoint, settings)  # before anything is allocated
    tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(sources), **offline)
    parameters = checkpoint.parameters
    choice = choose_dtype(device, config, parameters, settings, quantization)
    dtype = choice.dtype
    kwargs: dict[str, Any] = {**offline, "use_safetensors": True, "dtype": dtype}
    quantization_config = _quantization_config(quantization, dtype, device)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
        kwargs["device_map"] = {"": device}
    loaded: Any  # (model, loading info) with output_loading_info
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if memory is not None:
            loaded = model_from_memory(memory, config, output_loading_info=True, **kwargs)
        else:
            loaded = AutoModelForCausalLM.from_pretrained(
                base_dir, config=config, output_loading_info=True, **kwargs
            )
    model, info = loaded
    problem = loading_problem(info)  # what the header check can't follow (tensors merged at load, say)
    if problem is not None:
        del model, loaded
        _release_memory()
        raise ModelLoadError(problem, field="model_path")
    if quantization_config is None:
        model = model.to(device)
    model, merged = attach_adapters(model, sources, quantization)
    model.eval()
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer, choice, _context_length(config, tokenizer, settings), parameters, merged
