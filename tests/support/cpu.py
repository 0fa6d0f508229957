"""What this machine's CPU has, for tests of code paths that depend on it."""

from __future__ import annotations

from pathlib import Path

import pytest


def _avx512_bf16() -> bool:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("flags"):
            return "avx512_bf16" in line.split()
    return False


# our own matmul (function/engine/native_matmul.h) runs where the CPU has AVX-512 BF16
AVX512_BF16 = _avx512_bf16()
needs_avx512_bf16 = pytest.mark.skipif(not AVX512_BF16, reason="our matmul needs AVX-512 BF16")
