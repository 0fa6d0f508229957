"""What the CPU we run on decides: the dtype of a CPU model, and how many threads torch uses.

The dtype rule, measured (`make bench-dtype`, docs/benchmarks.md): on a CPU with native bf16 dot
products (AVX512-BF16 or AMX), bfloat16 decodes 1.7-2.6x faster than float32 at batch 1 on real
architectures from SmolLM2-135M (deep and narrow: 30 layers, width 576) to Llama-3.2-1B, and
slower only on toy models of a few million parameters, where per-operation overhead dominates.
Without native bf16 the conversions cost more than the halved weight traffic saves: float32.
Greedy requests are micro-batched in bfloat16 only where our decoder measured at load that batched
rows decode bitwise as they do alone (function.engine.decoder; the engine's exactness policy).
A model quantized on CPU (torchao) keeps its int8/int4 layers computing in bfloat16; around them,
which dtype is faster depends on the decoder that will run it (measured on SmolLM2-135M, 6
interleaved rounds of 128 tokens): our decoder (function.engine.decoder) in bfloat16, 144.3 vs
138.2 tok/s at 4-bit, 116.1 vs 111.9 at 8-bit; transformers' decode in float32, 76.2 vs 73.0 at
4-bit. The choice is made before the load, from the model type and the settings that pick the
decoder (`DECODER_MODEL_TYPES`); /model_info says which decoder ran it.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from function.config import MAX_THREADS, Settings

logger = logging.getLogger(__name__)

LAMBDA_MB_PER_VCPU = 1769  # Lambda: one vCPU's worth of CPU at 1,769 MB of memory
LAMBDA_MAX_VCPUS = 6  # at 10,240 MB


# The model types our CPU decoder runs (function.engine.decoder_choice takes them from here): the dtype
# around quantized layers is chosen for the decoder that will run them.
DECODER_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class DtypeChoice:
    """The dtype a model is served in, and why (shown in /model_info)."""

    dtype: Any  # a torch.dtype
    reason: str


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 instructions (AVX512-BF16 or AMX), read from /proc/cpuinfo."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def choose_cpu_dtype(
    parameters: int, settings: Settings, *, quantized: bool = False, model_type: str | None = None
) -> DtypeChoice:
    """CPU_DTYPE, with auto resolved by `auto_cpu_dtype` for this CPU; around quantized layers, by
    `quantized_cpu_dtype` for the decoder that will run `model_type` (module doc)."""
    import torch

    if settings.cpu_dtype == "float32":
        return DtypeChoice(torch.float32, "float32: CPU_DTYPE=float32")
    if settings.cpu_dtype == "bfloat16":
        return DtypeChoice(torch.bfloat16, "bfloat16: CPU_DTYPE=bfloat16")
    if quantized:
        return quantized_cpu_dtype(cpu_has_native_bf16(), settings, model_type)
    return auto_cpu_dtype(cpu_has_native_bf16(), parameters, settings.cpu_bf16_min_parameters)


def quantized_cpu_dtype(native_bf16: bool, settings: Settings, model_type: str | None) -> DtypeChoice:
    """Around int8/int4 layers (which compute in bfloat16): bfloat16 where our decoder will run the
    model on a CPU with native bfloat16, float32 for transformers' decode (module doc)."""
    import torch

    ours = settings.decoder == "auto" and not settings.torch_compile and model_type in DECODER_MODEL_TYPES
    if native_bf16 and ours:
        return DtypeChoice(
            torch.bfloat16,
            f"bfloat16: around int8/int4 layers, for our decoder (a {model_type} model; measured 3-4 % "
            "faster than float32 there)",
        )
    return DtypeChoice(
        torch.float32,
        "float32: around int8/int4 layers, which compute in bfloat16, for transformers' decode "
        "(measured 4 % faster than bfloat16 there)",
    )


def auto_cpu_dtype(native_bf16: bool, parameters: int, minimum: int) -> DtypeChoice:
    """bfloat16 with native bf16 and at least `minimum` parameters; else float32 (module doc)."""
    import torch

    if not native_bf16:
        return DtypeChoice(torch.float32, "float32: this CPU has no native bfloat16 (avx512_bf16, amx_bf16)")
    if parameters < minimum:
        return DtypeChoice(
            torch.float32,
            f"float32: {parameters:,} parameters < CPU_BF16_MIN_PARAMETERS={minimum:,}, too small for "
            "bfloat16 to be faster",
        )
    return DtypeChoice(
        torch.bfloat16,
        f"bfloat16: this CPU has native bfloat16 and {parameters:,} parameters >= "
        f"CPU_BF16_MIN_PARAMETERS={minimum:,}",
    )


def quiet_torchao_import() -> None:
    """torchao's PyPI wheel carries CUDA kernels only: on import it warns that each fails to load,
    and torch warns about its enum registrations. Neither matters on CPU (its kernels here are
    PyTorch's own) and transformers imports torchao for every model load: keep them out of the log."""
    logging.getLogger("torchao").setLevel(logging.ERROR)
    logging.getLogger("torch.utils._pytree").setLevel(logging.ERROR)


def lambda_vcpus(memory_mb: int) -> int:
    """The vCPUs Lambda gives a function of `memory_mb` (1,769 MB each, rounded, 1 to 6)."""
    return max(1, min(LAMBDA_MAX_VCPUS, math.floor(memory_mb / LAMBDA_MB_PER_VCPU + 0.5)))


def usable_cpus() -> set[int]:
    """The CPUs this process may run on (its affinity mask, which a container's cpuset narrows)."""
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not on Linux
        return set(range(os.cpu_count() or 1))


def usable_cores(cpus: set[int]) -> int:
    """The physical cores among `cpus`: hyperthread siblings share one core's matmul units, so one
    thread per core is what torch's own default picks too. The CPU count where sysfs can't tell."""
    cores = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add((topology / "physical_package_id").read_text() + (topology / "core_id").read_text())
        except OSError:
            return len(cpus)
    return len(cores) or len(cpus)


def openmp_threads(value: str | None) -> int | None:
    """OMP_NUM_THREADS's first number (it may list one per nesting level: "4,2"), at most MAX_THREADS;
    None when it holds no positive number (OpenMP ignores such a value too)."""
    first = (value or "").split(",")[0].strip()
    if not first.isdigit() or int(first) < 1:
        return None
    return min(int(first), MAX_THREADS)


def thread_count(settings: Settings) -> int:
    """TORCH_THREADS (or OMP_NUM_THREADS); else on Lambda its vCPUs (from the memory size), within
    the CPUs it shows; else the physical cores this process may run on."""
    if settings.torch_threads:
        return settings.torch_threads
    omp = openmp_threads(settings.omp_num_threads)
    if omp:
        return omp
    cpus = usable_cpus()
    if settings.aws_lambda_function_memory_size:
        return min(len(cpus), lambda_vcpus(settings.aws_lambda_function_memory_size))
    return usable_cores(cpus)


def configure_threads(settings: Settings) -> int:
    """Set torch's intra-op threads to `thread_count`; returns it."""
    import torch

    threads = thread_count(settings)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
        logger.info("torch intra-op threads: %d", threads)
    return threads
