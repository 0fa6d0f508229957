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


def _our_matmuls() -> bool:
    """Whether the decoder puts bf16 projections on our own matmul here: the C++ step built, AVX-512
    BF16, and oneDNN packing bf16 weights in the layout our matmul reads (`own_matmul_agrees`, the
    load's check; with AMX oneDNN may pack another, and the decoder keeps oneDNN's matmuls). On a
    thread that ends with the check (its OpenMP workers go with it: function.engine.torch_thread)."""
    import torch

    from function.engine import native
    from function.engine.torch_thread import in_own_thread

    module, _ = native.load()
    if module is None or not module.own_matmul_supported():
        return False
    weight = torch.randn(128, 64, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def agrees() -> bool:
        return bool(module.own_matmul_agrees(torch.ops.mkldnn._reorder_linear_weight(weight, 1)))

    return in_own_thread(agrees)


# our own matmul (function/engine/native_matmul.h) on a tied output layer's plain weights: AVX-512 BF16
AVX512_BF16 = _avx512_bf16()
needs_avx512_bf16 = pytest.mark.skipif(not AVX512_BF16, reason="our matmul needs AVX-512 BF16")
# ... and on oneDNN's packed weights, every layer's (and a packed output layer's)
OUR_MATMULS = AVX512_BF16 and _our_matmuls()
needs_our_matmuls = pytest.mark.skipif(
    not OUR_MATMULS, reason="our matmul needs AVX-512 BF16 and oneDNN's packed layout that it reads"
)


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
