"""The bytes a loaded model really holds.

`PreTrainedModel.get_memory_footprint` multiplies each tensor's element count by its nominal
element size: a torchao tensor subclass reports its unquantized dtype (an int4 weight counted as
bfloat16 is 4x too big). Here a subclass is counted by the plain tensors inside it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import is_traceable_wrapper_subclass


def tensor_bytes(tensor: torch.Tensor) -> int:
    """Storage bytes of a tensor, or of the inner tensors of a wrapper subclass (torchao's)."""
    if is_traceable_wrapper_subclass(tensor):
        names, _ = tensor.__tensor_flatten__()
        inner = (getattr(tensor, name) for name in names)
        return sum(tensor_bytes(part) for part in inner if isinstance(part, torch.Tensor))
    return tensor.numel() * tensor.element_size()


def model_bytes(model: Any) -> int:
    """Parameters and buffers, each shared tensor once (tied weights)."""
    seen: set[int] = set()
    total = 0
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor_bytes(tensor)
    return total
