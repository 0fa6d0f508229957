"""Device, dtype and quantization choices, and client-safe load errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from function.errors import InvalidRequestError
from function.weights.loading import (
    choose_dtype,
    cpu_has_native_bf16,
    quantization_backend,
    quantization_from_flags,
    safe_reason,
)
from tests.support.settings import make_settings


def test_quantization_flags() -> None:
    assert quantization_from_flags(False, False) == "none"
    assert quantization_from_flags(True, False) == "8bit"
    assert quantization_from_flags(False, True) == "4bit"
    with pytest.raises(InvalidRequestError):
        quantization_from_flags(True, True)


def test_quantization_backend_is_torchao_on_cpu_and_bitsandbytes_on_cuda() -> None:
    assert quantization_backend("none", "cpu") is None and quantization_backend("none", "cuda") is None
    assert quantization_backend("8bit", "cpu") == quantization_backend("4bit", "cpu") == "torchao"
    assert quantization_backend("8bit", "cuda") == quantization_backend("4bit", "cuda") == "bitsandbytes"


def test_cuda_keeps_the_checkpoints_half_dtype() -> None:
    from transformers import LlamaConfig

    settings = make_settings()
    for dtype in (torch.bfloat16, torch.float16):
        choice = choose_dtype("cuda", LlamaConfig(dtype=dtype), 10, settings)
        assert choice.dtype is dtype and choice.reason.endswith("the checkpoint's dtype")


def test_cpu_dtype_follows_the_setting_and_the_models_size() -> None:
    from transformers import LlamaConfig

    config = LlamaConfig()
    assert choose_dtype("cpu", config, 10**9, make_settings(cpu_dtype="float32")).dtype is torch.float32
    assert choose_dtype("cpu", config, 10, make_settings(cpu_dtype="bfloat16")).dtype is torch.bfloat16
    auto = make_settings(cpu_dtype="auto", cpu_bf16_min_parameters=1000)
    assert choose_dtype("cpu", config, 999, auto).dtype is torch.float32
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert choose_dtype("cpu", config, 1000, auto).dtype is expected


def test_safe_reason_strips_paths() -> None:
    exc = OSError(
        "Error no file named model.safetensors found in directory /srv/models/secret_v2 "
        "or /home/alice/.cache/huggingface"
    )

    reason = safe_reason(exc, Path("/srv/models/secret_v2"))

    assert reason.startswith("OSError: ")
    assert "/srv" not in reason and "/home" not in reason and "alice" not in reason
    assert "<model_path>" in reason
