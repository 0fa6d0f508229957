"""The CPU's decisions: the auto dtype rule and its reason, Lambda's vCPUs, torch's thread count."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
import torch
from pydantic import ValidationError

from function.config import MAX_THREADS, Settings
from function.weights.cpu import (
    auto_cpu_dtype,
    choose_cpu_dtype,
    configure_threads,
    cpu_has_native_bf16,
    lambda_vcpus,
    openmp_threads,
    quantized_cpu_dtype,
    thread_count,
    usable_cores,
    usable_cpus,
)
from tests.support.settings import make_settings


def test_auto_is_float32_without_native_bf16_whatever_the_size() -> None:
    choice = auto_cpu_dtype(False, 10**9, 8_000_000)

    assert choice.dtype is torch.float32
    assert choice.reason == "float32: this CPU has no native bfloat16 (avx512_bf16, amx_bf16)"


def test_auto_is_float32_for_toy_models_on_native_bf16() -> None:
    choice = auto_cpu_dtype(True, 311_360, 8_000_000)

    assert choice.dtype is torch.float32
    assert choice.reason.startswith("float32: 311,360 parameters < CPU_BF16_MIN_PARAMETERS=8,000,000")


def test_auto_is_bfloat16_for_real_models_on_native_bf16() -> None:
    # SmolLM2-135M (deep and narrow) measured 1.7-1.9x faster in bfloat16 at batch 1 (docs/benchmarks.md)
    choice = auto_cpu_dtype(True, 134_515_008, 8_000_000)

    assert choice.dtype is torch.bfloat16
    assert choice.reason == (
        "bfloat16: this CPU has native bfloat16 and 134,515,008 parameters >= "
        "CPU_BF16_MIN_PARAMETERS=8,000,000"
    )


def test_explicit_cpu_dtype_wins_and_says_so() -> None:
    assert choose_cpu_dtype(10, make_settings(cpu_dtype="bfloat16")).reason == "bfloat16: CPU_DTYPE=bfloat16"
    choice = choose_cpu_dtype(10**9, make_settings(cpu_dtype="float32"))
    assert choice.dtype is torch.float32 and choice.reason == "float32: CPU_DTYPE=float32"


def test_auto_around_quantized_layers_follows_the_decoder_that_will_run_them() -> None:
    auto = make_settings(cpu_dtype="auto")
    ours = quantized_cpu_dtype(True, auto, "llama")
    gpt2 = quantized_cpu_dtype(True, auto, "gpt2")  # a model type our decoder does not take
    setting = quantized_cpu_dtype(True, make_settings(cpu_dtype="auto", decoder="transformers"), "llama")
    no_native = quantized_cpu_dtype(False, auto, "llama")

    assert ours.dtype is torch.bfloat16 and ours.reason.startswith(
        "bfloat16: around int8/int4 layers, for our decoder (a llama model"
    )
    assert gpt2.dtype is setting.dtype is no_native.dtype is torch.float32
    assert gpt2.reason.startswith(
        "float32: around int8/int4 layers, which compute in bfloat16, for transformers'"
    )
    # on this CPU, through the setting
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert choose_cpu_dtype(10**9, auto, quantized=True, model_type="qwen2").dtype is expected
    explicit = choose_cpu_dtype(10**9, make_settings(cpu_dtype="float32"), quantized=True, model_type="llama")
    assert explicit.dtype is torch.float32


def test_auto_follows_this_cpu_and_the_setting() -> None:
    settings = make_settings(cpu_dtype="auto", cpu_bf16_min_parameters=1000)

    assert choose_cpu_dtype(999, settings).dtype is torch.float32
    expected = torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    assert choose_cpu_dtype(1000, settings).dtype is expected


@pytest.mark.parametrize(
    ("memory_mb", "vcpus"),
    [(128, 1), (1024, 1), (1769, 1), (2654, 2), (3008, 2), (3538, 2), (5307, 3), (8845, 5), (10240, 6)],
)
def test_lambda_vcpus_follow_memory(memory_mb: int, vcpus: int) -> None:
    assert lambda_vcpus(memory_mb) == vcpus


def test_usable_cpus_are_the_affinity_mask_and_cores_count_each_core_once() -> None:
    cpus = usable_cpus()

    assert cpus == os.sched_getaffinity(0)
    assert 1 <= usable_cores(cpus) <= len(cpus)
    assert usable_cores({min(cpus)}) == 1


def settings_outside_lambda(**values: object) -> Settings:
    """No thread variables from the environment the tests run in."""
    empty = {"torch_threads": None, "omp_num_threads": None, "aws_lambda_function_memory_size": None}
    return make_settings(**{**empty, **values})


def test_thread_count_prefers_the_settings_then_lambda_then_the_cores() -> None:
    assert thread_count(settings_outside_lambda(torch_threads=3)) == 3
    assert thread_count(settings_outside_lambda(omp_num_threads="5")) == 5
    assert thread_count(settings_outside_lambda(torch_threads=2, omp_num_threads="5")) == 2
    assert thread_count(settings_outside_lambda(aws_lambda_function_memory_size=1769)) == 1
    on_big_lambda = thread_count(settings_outside_lambda(aws_lambda_function_memory_size=10240))
    assert on_big_lambda == min(6, len(usable_cpus()))
    assert thread_count(settings_outside_lambda()) == usable_cores(usable_cpus())


@pytest.mark.parametrize(
    ("value", "expected"),
    [("4,2", 4), (" 3 ", 3), ("100000", MAX_THREADS), ("0", None), ("many", None), ("", None), (None, None)],
)
def test_omp_num_threads_counts_its_first_number_bounded_and_ignores_the_rest(
    value: str | None, expected: int | None
) -> None:
    assert openmp_threads(value) == expected
    if expected is None:  # falls through to the cores, rather than failing the start
        assert thread_count(settings_outside_lambda(omp_num_threads=value)) == usable_cores(usable_cpus())


def test_torch_threads_is_bounded() -> None:
    with pytest.raises(ValidationError, match="less than or equal to 256"):
        make_settings(torch_threads=100_000)


@pytest.fixture
def restored_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("restored_threads")
def test_configure_threads_sets_torchs_intra_op_threads() -> None:
    assert configure_threads(settings_outside_lambda(torch_threads=1)) == 1
    assert torch.get_num_threads() == 1
    assert (
        configure_threads(settings_outside_lambda()) == usable_cores(usable_cpus()) == torch.get_num_threads()
    )
