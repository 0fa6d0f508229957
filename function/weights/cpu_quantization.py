"""`--load_in_8bit` / `--load_in_4bit` on CPU: weight-only int8 / int4 with PyTorch's own CPU kernels.

bitsandbytes' CPU path decodes at float32's pace (8-bit) or bfloat16's (4-bit); this one at about
3x float32 (docs/benchmarks.md). CUDA keeps bitsandbytes. Here the flags go through transformers'
`TorchAoConfig` with a torchao config of our own (torchao's extension point), which quantizes each
linear layer as its weight is loaded: int8 per output row (torchao's `Int8Tensor`, multiplied by
`torch._weight_int8pack_mm`), or int4 in groups (torchao's `Int4OpaqueTensor`, PyTorch's
`_weight_int4pack_mm_for_cpu`). Both kernels are fast in bfloat16 only (float32 activations
measured 6-190x slower at batch 1), so activations are cast to bfloat16 around the matmul and back:
the rest of the model keeps the dtype the loader chose.

transformers leaves both embeddings out; `quantize_embeddings` does them after the load: the
output one (`lm_head`, untied from the input one) is on a small model the largest matmul of a
decode step (SmolLM2-135M: 28M of its 135M parameters), and the input one's rows are int8 or
packed int4, dequantized per looked-up token.

Imported only when a quantized CPU load asks for it (it registers a torchao handler).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.nn import functional
from torchao.core.config import AOBaseConfig
from torchao.prototype.quantization.int4.int4_opaque_tensor import Int4OpaqueTensor
from torchao.quantization import Int8Tensor
from torchao.quantization.granularity import PerRow
from torchao.quantization.transform_module import register_quantize_module_handler

from function.engine.types import Quantization

logger = logging.getLogger(__name__)

KERNEL_DTYPE = torch.bfloat16
INT4_GROUP_SIZES = (128, 64, 32)  # what the int4 CPU kernel takes, fewest scales first
INT4_OUT_MULTIPLE = 16  # the int4 CPU packing needs out_features divisible by this
Bits = Literal[8, 4]
BITS: dict[Quantization, Bits] = {"8bit": 8, "4bit": 4}


@dataclass
class CpuWeightOnlyConfig(AOBaseConfig):  # type: ignore[misc]
    """Weight-only int8 or int4 for the linear layers transformers hands to torchao."""

    bits: Bits = 8


def torchao_config(quantization: Quantization) -> Any:
    """transformers' `TorchAoConfig` for "8bit" or "4bit" (the linear layers; see `quantize_embeddings`)."""
    from transformers import TorchAoConfig

    return TorchAoConfig(CpuWeightOnlyConfig(bits=BITS[quantization]))


def quantize_embeddings(model: Any, quantization: Quantization) -> None:
    """Quantize the output embedding (its own copy when tied) and the input embedding, in place.
    A layer an adapter wraps is left as it is."""
    bits = BITS[quantization]
    output = model.get_output_embeddings()
    if type(output) is nn.Linear:
        _quantize_linear(output, bits)  # a new weight: no longer tied to the input embedding's
    embedding = model.get_input_embeddings()
    if type(embedding) is nn.Embedding:
        _quantize_embedding(embedding, bits)
    model.config.get_text_config(decoder=True).tie_word_embeddings = False  # no re-tying later


def int4_group_size(in_features: int) -> int | None:
    """The coarsest group size the int4 kernel takes that divides `in_features`; None if none does."""
    return next((size for size in INT4_GROUP_SIZES if in_features % size == 0), None)


class Int8Linear(nn.Linear):
    """`weight` is torchao's per-row `Int8Tensor`; the matmul is PyTorch's int8 CPU kernel."""

    kernel_scale: torch.Tensor

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.reshape(-1, input.shape[-1]).to(KERNEL_DTYPE)
        codes = cast(Any, self.weight).qdata  # int8, (out_features, in_features)
        output = torch._weight_int8pack_mm(rows, codes, self.kernel_scale)
        output = output.reshape(*input.shape[:-1], output.shape[-1]).to(input.dtype)
        return output if self.bias is None else output + self.bias


class Int4Linear(nn.Linear):
    """`weight` is torchao's `Int4OpaqueTensor` (packed for PyTorch's int4 CPU kernel), its rows
    padded with zeros to a multiple of 16 where `out_features` is not one (a vocabulary of 50257)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output = functional.linear(input.to(KERNEL_DTYPE), self.weight)[..., : self.out_features]
        output = output.to(input.dtype)
        return output if self.bias is None else output + self.bias


class QuantizedEmbedding(nn.Embedding):
    """Rows stored as 8- or 4-bit codes (two per byte) with a scale and an offset per group; each
    looked-up row is dequantized to the dtype the embedding had."""

    bits: int
    group_size: int
    scale: torch.Tensor
    offset: torch.Tensor
    output_dtype: torch.dtype

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        codes = functional.embedding(input, self.weight)
        if self.bits == 4:
            codes = torch.stack((codes & 0x0F, codes >> 4), dim=-1).flatten(-2)
        groups = codes.unflatten(-1, (-1, self.group_size)).float()
        rows = groups * functional.embedding(input, self.scale).float().unsqueeze(-1)
        rows = rows + functional.embedding(input, self.offset).float().unsqueeze(-1)
        output: torch.Tensor = rows.flatten(-2).to(self.output_dtype)
        return output


def _quantize_rows(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, ...]:
    """Asymmetric min/max quantization of each group of `group_size` values in a row."""
    groups = weight.detach().float().unflatten(-1, (-1, group_size))
    levels = 2**bits - 1
    low = groups.amin(dim=-1).to(KERNEL_DTYPE)  # stored in bfloat16: codes are chosen against those
    scale = ((groups.amax(dim=-1) - low.float()) / levels).to(KERNEL_DTYPE)
    scale = scale.clamp(min=torch.finfo(KERNEL_DTYPE).tiny)
    steps = (groups - low.float().unsqueeze(-1)) / scale.float().unsqueeze(-1)
    codes = steps.round().clamp(0, levels).to(torch.uint8).flatten(-2)
    if bits == 4:
        codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return codes.contiguous(), scale, low


def _quantize_embedding(module: nn.Embedding, bits: int) -> None:
    dim = module.embedding_dim
    group_size = dim if bits == 8 else int4_group_size(dim) or (dim if dim % 2 == 0 else 0)
    if not group_size:
        logger.info("embedding of odd width %d kept unquantized", dim)
        return
    output_dtype = module.weight.dtype
    codes, scale, offset = _quantize_rows(module.weight, bits, group_size)
    module.__class__ = QuantizedEmbedding
    quantized = cast(QuantizedEmbedding, module)
    quantized.weight = nn.Parameter(codes, requires_grad=False)
    quantized.register_buffer("scale", scale)
    quantized.register_buffer("offset", offset)
    quantized.bits, quantized.group_size, quantized.output_dtype = bits, group_size, output_dtype


def _quantize_linear(module: nn.Linear, bits: int) -> None:
    weight = module.weight.detach()
    if bits == 8:
        quantized = Int8Tensor.from_hp(weight, PerRow())
        module.__class__ = Int8Linear
        module.weight = nn.Parameter(quantized, requires_grad=False)
        module.register_buffer("kernel_scale", quantized.scale.flatten().to(KERNEL_DTYPE))
        return
    group_size = int4_group_size(module.in_features)
    if group_size is None:
        logger.info("linear layer %s kept unquantized (no int4 group size fits)", tuple(weight.shape))
        return
    padding = -module.out_features % INT4_OUT_MULTIPLE
    padded = functional.pad(weight.to(KERNEL_DTYPE), (0, 0, 0, padding))
    packed = Int4OpaqueTensor.from_hp(padded, [1, group_size])
    module.__class__ = Int4Linear
    module.weight = nn.Parameter(packed, requires_grad=False)


@register_quantize_module_handler(CpuWeightOnlyConfig)  # type: ignore[untyped-decorator]
def _quantize_module(module: nn.Module, config: CpuWeightOnlyConfig, **_: Any) -> nn.Module:
    """torchao calls this for each linear layer transformers quantizes; in place (it is a root)."""
    if isinstance(module, nn.Linear):
        _quantize_linear(module, config.bits)
    return module
