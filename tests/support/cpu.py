"""What this machine's CPU has, for tests of code paths that depend on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest


def _avx512_bf16() -> bool:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            return "avx512_bf16" in line.split()
    return False


# our own matmul (function/engine/native_matmul.h) runs where the CPU has AVX-512 BF16
AVX512_BF16 = _avx512_bf16()
needs_avx512_bf16 = pytest.mark.skipif(not AVX512_BF16, reason="our matmul needs AVX-512 BF16")


def onednn_matmuls(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decoders attached from now on (in this test) keep oneDNN's bf16 matmuls, the output layer's
    too, as on a CPU without AVX-512 BF16 (where `own_matmul_supported` is false): their batches
    and drafts are then measured at load (function.engine.calibration) instead of alike by
    construction."""
    from function.engine import native

    layers = native.native_layers

    def onednn_layers(decoder: Any, own_matmuls: bool = True) -> tuple[Any, str, bool]:
        return layers(decoder, own_matmuls=False)

    monkeypatch.setattr(native, "native_layers", onednn_layers)
    monkeypatch.setattr(native, "native_head", lambda decoder: None)
