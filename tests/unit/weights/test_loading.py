"""Device, dtype and quantization choices, and client-safe load errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from function.errors import InvalidRequestError
from function.weights.loading import (
    choose_dtype,
    cpu_has_native_bf16,
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


def test_cuda_keeps_the_checkpoints_half_dtype() -> None:
    settings = make_settings()
    assert choose_dtype("cuda", torch.bfloat16, 10, settings) is torch.bfloat16
    assert choose_dtype("cuda", torch.float16, 10, settings) is torch.float16


def test_cpu_dtype_settings() -> None:
    assert choose_dtype("cpu", torch.bfloat16, 10**9, make_settings(cpu_dtype="float32")) is torch.float32
    assert choose_dtype("cpu", torch.float32, 10, make_settings(cpu_dtype="bfloat16")) is torch.bfloat16


def test_cpu_auto_uses_bf16_only_when_native_and_the_model_is_big_enough() -> None:
    settings = make_settings(cpu_dtype="auto", cpu_bf16_min_parameters=1000)

    assert choose_dtype("cpu", torch.bfloat16, 999, settings) is torch.float32
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert choose_dtype("cpu", torch.bfloat16, 1000, settings) is expected


def test_safe_reason_strips_paths() -> None:
    exc = OSError(
        "Error no file named model.safetensors found in directory /srv/models/secret_v2 "
        "or /home/alice/.cache/huggingface"
    )

    reason = safe_reason(exc, Path("/srv/models/secret_v2"))

    assert reason.startswith("OSError: ")
    assert "/srv" not in reason and "/home" not in reason and "alice" not in reason
    assert "<model_path>" in reason
