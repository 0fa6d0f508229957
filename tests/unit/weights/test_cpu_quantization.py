"""8-bit and 4-bit on CPU through torchao: every layer quantized, outputs close to the unquantized
model's, the real model's answers kept, and the memory the flags promise."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from function.engine.engine import Engine
from function.engine.types import Quantization, SamplingParams
from function.weights.cpu_quantization import (
    Int4Linear,
    Int8Linear,
    QuantizedEmbedding,
    int4_group_size,
)
from function.weights.footprint import model_bytes, tensor_bytes
from function.weights.loading import LoadedModel
from tests.support.example_model import example_model_dir
from tests.support.settings import make_settings

LINEAR = {"8bit": Int8Linear, "4bit": Int4Linear}
QUESTION = "What is the capital of France?"


def load(model_dir: Path, quantization: Quantization = "none", **settings: Any) -> tuple[Engine, LoadedModel]:
    engine = Engine(make_settings(**settings))
    loaded, _ = engine.load(str(model_dir), quantization)
    return engine, loaded


def logits(loaded: LoadedModel, text: str) -> torch.Tensor:
    encoded = loaded.tokenizer(text, return_tensors="pt")
    with torch.inference_mode():
        output: torch.Tensor = loaded.model(**encoded).logits[0].float()
    return output


def test_int4_group_size_is_the_coarsest_the_kernel_takes() -> None:
    assert int4_group_size(1536) == 128 and int4_group_size(576) == 64 and int4_group_size(96) == 32
    assert int4_group_size(48) is None


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_every_linear_layer_and_both_embeddings_are_quantized_on_cpu(
    demo_model_dir: Path, quantization: Quantization
) -> None:
    # WHEN the demo model loads with a quantization flag on CPU (transformers' layers as loaded: our
    # decoder fuses them, tests/unit/engine/test_decoder.py)
    engine, loaded = load(demo_model_dir, quantization, decoder="transformers")

    # THEN torchao's path holds every linear layer, the output embedding and the input embedding
    assert loaded.quantization == quantization and loaded.quantization_backend == "torchao"
    model = loaded.model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(type(m) is LINEAR[quantization] for m in linears)
    assert type(model.get_output_embeddings()) is LINEAR[quantization]
    assert type(model.get_input_embeddings()) is QuantizedEmbedding
    assert not any("bitsandbytes" in type(m).__module__ for m in model.modules())
    # AND it generates
    result = engine.generate("Python이란?", SamplingParams(max_new_tokens=8, temperature=0))
    assert result.completion_tokens > 0


@pytest.mark.parametrize(("quantization", "tolerance"), [("8bit", 0.03), ("4bit", 0.25)])
def test_quantized_logits_stay_close_to_float32(
    demo_model_dir: Path, quantization: Quantization, tolerance: float
) -> None:
    _, full = load(demo_model_dir)
    _, quantized = load(demo_model_dir, quantization)
    text = "Python이란 무엇인가요? 머신러닝을 설명하세요"

    expected, actual = logits(full, text), logits(quantized, text)

    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    error = (actual - expected).norm() / expected.norm()
    assert error < tolerance


def test_4bit_memory_is_at_most_035_of_16bit(demo_model_dir: Path) -> None:
    _, sixteen_bit = load(demo_model_dir, cpu_dtype="bfloat16")
    _, eight_bit = load(demo_model_dir, "8bit")
    _, four_bit = load(demo_model_dir, "4bit")

    assert four_bit.memory_bytes() <= 0.35 * sixteen_bit.memory_bytes()
    assert four_bit.memory_bytes() < eight_bit.memory_bytes() < sixteen_bit.memory_bytes()


def test_model_bytes_count_torchao_tensors_by_what_they_hold(demo_model_dir: Path) -> None:
    _, four_bit = load(demo_model_dir, "4bit", decoder="transformers")
    layer = four_bit.model.get_output_embeddings()

    # get_memory_footprint counts an int4 weight at its nominal bfloat16 size; the packed codes are 1/4
    nominal = layer.weight.numel() * layer.weight.element_size()
    assert tensor_bytes(layer.weight) < 0.3 * nominal
    assert model_bytes(four_bit.model) == four_bit.memory_bytes() < four_bit.model.get_memory_footprint()


@pytest.fixture(scope="module")
def example_model() -> Path:
    return example_model_dir()


@pytest.mark.slow
@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_the_real_model_still_knows_the_capital_of_france(
    example_model: Path, quantization: Quantization
) -> None:
    engine, loaded = load(example_model, quantization, max_new_tokens=24)

    answer = engine.chat(QUESTION, "", SamplingParams(max_new_tokens=24, temperature=0))

    assert loaded.quantization_backend == "torchao"
    assert "Paris" in answer.continuations[0]


@pytest.mark.slow
def test_the_real_models_4bit_memory_is_at_most_035_of_16bit(example_model: Path) -> None:
    _, sixteen_bit = load(example_model, cpu_dtype="bfloat16")
    sixteen_bit_bytes = sixteen_bit.memory_bytes()
    del sixteen_bit
    _, four_bit = load(example_model, "4bit")

    assert four_bit.memory_bytes() <= 0.35 * sixteen_bit_bytes
