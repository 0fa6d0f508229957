"""Linear layers laid out for fast CPU matmuls at batch 1: one matmul for the layers that read the
same input (q, k and v; gate and up), float weights packed for oneDNN.

Measured on SmolLM2-135M, 2 cores (docs/benchmarks.md): PyTorch's default bfloat16 matmul at batch 1
took 10.3 ms a token, oneDNN on packed weights 3.8 ms; and each matmul call costs about 15 us before
any arithmetic, so 4 calls a layer instead of 7 save a further ~1.5 ms. int8 and int4 layers
(`function.weights.cpu_quantization`) are fused the same way (their codes and scales side by side).

`decoder_choice.fuse_model` does it in place: transformers' own forward still works on the model
(each original layer becomes a `ProjectionSlice` of the fused one, sharing its weights: no second copy).
"""

from __future__ import annotations

import ctypes
import mmap
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

PACKED_DTYPES = (torch.bfloat16, torch.float32)
QUANTIZATION_MODULE = "function.weights.cpu_quantization"


class Projection(nn.Module):
    """Several linear layers over one input as one matmul; `forward` returns their outputs side by
    side (`offsets[i]:offsets[i] + sizes[i]` is layer i's)."""

    def __init__(self, sizes: Sequence[int], offsets: Sequence[int], bias: torch.Tensor | None) -> None:
        super().__init__()
        self.sizes = tuple(sizes)
        self.offsets = tuple(offsets)
        self.register_buffer("bias", bias)
        self.bias: torch.Tensor | None


class PackedProjection(Projection):
    """Float weights in oneDNN's packed layout (`torch._mkldnn`)."""

    weight: torch.Tensor

    def __init__(self, weight: torch.Tensor, sizes: Sequence[int], bias: torch.Tensor | None) -> None:
        super().__init__(sizes, _offsets(sizes), bias)
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            input, self.weight, self.bias, "none", [None], ""
        )
        return output


class Int8Projection(Projection):
    """int8 codes per output row and their bfloat16 scales: PyTorch's int8 CPU kernel."""

    codes: torch.Tensor
    scales: torch.Tensor

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, sizes: Sequence[int], bias: Any) -> None:
        super().__init__(sizes, _offsets(sizes), bias)
        self.register_buffer("codes", codes)
        self.register_buffer("scales", scales)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.reshape(-1, input.shape[-1]).to(torch.bfloat16)
        output = torch._weight_int8pack_mm(rows, self.codes, self.scales)
        output = output.reshape(*input.shape[:-1], output.shape[-1]).to(input.dtype)
        return output if self.bias is None else output + self.bias


class Int4Projection(Projection):
    """int4 codes packed for PyTorch's int4 CPU kernel, with their group scales and zeros; each layer's
    rows padded to a multiple of 16 (the kernel's), so `offsets` skip the padding."""

    packed: torch.Tensor
    scale_and_zero: torch.Tensor

    def __init__(
        self,
        packed: torch.Tensor,
        scale_and_zero: torch.Tensor,
        group_size: int,
        sizes: Sequence[int],
        offsets: Sequence[int],
        bias: Any,
    ) -> None:
        super().__init__(sizes, offsets, bias)
        self.group_size = group_size
        self.register_buffer("packed", packed)
        self.register_buffer("scale_and_zero", scale_and_zero)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        rows = input.reshape(-1, input.shape[-1]).to(torch.bfloat16).contiguous()
        output: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, self.packed, self.group_size, self.scale_and_zero
        )
        if len(self.sizes) == 1:
            output = output[:, : self.sizes[0]]
        output = output.reshape(*input.shape[:-1], output.shape[-1]).to(input.dtype)
        return output if self.bias is None else output + self.bias


class ProjectionSlice(nn.Module):
    """One of a fused projection's layers, for transformers' forward: the fused matmul, sliced."""

    def __init__(self, fused: Projection, index: int) -> None:
        super().__init__()
        self.fused = fused
        self.start = fused.offsets[index]
        self.stop = self.start + fused.sizes[index]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.fused(input)[..., self.start : self.stop]
        return output


def _offsets(sizes: Sequence[int]) -> list[int]:
    return [sum(sizes[:index]) for index in range(len(sizes))]


def _bias(layers: Sequence[Any]) -> torch.Tensor | None:
    biases = [getattr(layer, "bias", None) for layer in layers]
    if all(bias is None for bias in biases):
        return None
    return torch.cat(
        [
            bias.detach() if bias is not None else torch.zeros(layer.out_features, dtype=_dtype(layers))
            for bias, layer in zip(biases, layers, strict=True)
        ]
    )


def _dtype(layers: Sequence[Any]) -> torch.dtype:
    dtype: torch.dtype = next(
        bias.dtype for layer in layers if (bias := getattr(layer, "bias", None)) is not None
    )
    return dtype


def fusable(layers: Sequence[Any]) -> bool:
    """Whether `fuse` takes `layers`: all plain float layers of one dtype, or all int8, or all int4
    with one group size and no row padding. Checked before anything is allocated."""
    kinds = {type(layer) for layer in layers}
    if len(kinds) != 1:
        return False
    kind = kinds.pop()
    if kind is nn.Linear:
        return len({layer.weight.dtype for layer in layers}) == 1 and layers[0].weight.dtype in PACKED_DTYPES
    quantization = sys.modules.get(QUANTIZATION_MODULE)
    if quantization is None:
        return False
    if kind is quantization.Int8Linear:
        return True
    if kind is quantization.Int4Linear:
        weights = [layer.weight for layer in layers]
        return len({weight.block_size[1] for weight in weights}) == 1 and (
            len(layers) == 1 or all(int(w.qdata.shape[0]) == int(w.shape[0]) for w in weights)
        )
    return False


def fuse(layers: Sequence[Any]) -> Projection:
    """One projection for `layers` (same input; `fusable`)."""
    sizes = [int(layer.out_features) for layer in layers]
    kind = type(layers[0])
    if kind is nn.Linear:
        weight = (
            torch.cat([layer.weight.detach() for layer in layers]) if len(layers) > 1 else layers[0].weight
        )
        return PackedProjection(weight, sizes, _bias(layers))
    quantization = sys.modules[QUANTIZATION_MODULE]
    if kind is quantization.Int8Linear:
        codes = torch.cat([layer.weight.qdata for layer in layers])
        scales = torch.cat([layer.kernel_scale for layer in layers])
        return Int8Projection(codes, scales, sizes, _bias(layers))
    weights = [layer.weight for layer in layers]
    packed = torch.cat([weight.qdata for weight in weights])
    scale_and_zero = torch.cat([weight.scale_and_zero for weight in weights], dim=1)
    return Int4Projection(
        packed, scale_and_zero, weights[0].block_size[1], sizes, _offsets(sizes), _bias(layers)
    )


def fuse_into(parent: nn.Module, names: Sequence[str]) -> Projection:
    """Fuse `parent`'s layers `names` (`fusable`) and put a `ProjectionSlice` of the fused one in each
    one's place (for a single name: the projection itself)."""
    fused = fuse([getattr(parent, name) for name in names])
    if len(names) == 1:
        setattr(parent, names[0], fused)
    else:
        for index, name in enumerate(names):
            setattr(parent, name, ProjectionSlice(fused, index))
    return fused


def plain_weights(layers: Iterable[Any]) -> list[torch.Tensor]:
    """The plain float weights (and biases) of `layers`: what `release_pages` may give back once
    they are replaced. Quantized layers' codes were allocated by the quantization: freed with them."""
    tensors: list[torch.Tensor] = []
    for layer in layers:
        if type(layer) is nn.Linear:
            tensors.extend(t.detach() for t in (layer.weight, layer.bias) if t is not None)
    return tensors


def _span(tensor: torch.Tensor) -> tuple[int, int]:
    """The bytes a strided tensor's elements lie in."""
    extent = sum((size - 1) * stride for size, stride in zip(tensor.shape, tensor.stride(), strict=True))
    start = tensor.data_ptr()
    return start, start + (extent + 1) * tensor.element_size() if tensor.numel() else start


def kept_spans(keep: Iterable[torch.Tensor]) -> list[tuple[int, int]]:
    """The bytes the tensors in `keep` lie in: what `release_pages` must not touch."""
    return sorted(_span(t) for t in keep if t.layout == torch.strided and t.device.type == "cpu")


def release_pages(replaced: Sequence[torch.Tensor], kept: Sequence[tuple[int, int]]) -> int:
    """madvise(DONTNEED) the whole pages of each replaced tensor that no kept span (`kept_spans`)
    touches; returns the bytes given back. A private file mapping re-reads them from the file if ever
    touched again, an anonymous one reads zeros: nothing still in use lies there (the `kept` check).
    Pages of ordinary allocations are freed when the tensors are; this only matters for views of a
    mapping that other views keep alive (transformers' safetensors files, WEIGHTS_IN_MEMORY's buffers)."""
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    released = 0
    for tensor in replaced:
        start, end = _span(tensor)
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        for kept_start, kept_end in kept:  # keep every page a kept tensor touches
            if kept_start < last and kept_end > first:
                if kept_start - first >= last - kept_end:
                    last = min(last, kept_start // mmap.PAGESIZE * mmap.PAGESIZE)
                else:
                    first = max(first, -(-kept_end // mmap.PAGESIZE) * mmap.PAGESIZE)
        if last > first and madvise(first, last - first, mmap.MADV_DONTNEED) == 0:
            released += last - first
    return released
