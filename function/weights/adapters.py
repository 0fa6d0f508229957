"""PEFT (LoRA) adapters over a loaded base model.

MODEL_PATH as an adapter: in full precision it is merged into the base at load (no per-token
cost); over an 8-bit or 4-bit base it stays unmerged (the QLoRA way). ADAPTERS: loaded unmerged
beside the base, and chosen per request (`adapter_names` in `generate`, "__base__" for the base).
"""

from __future__ import annotations

import warnings
from typing import Any

from function.engine.types import Quantization
from function.weights.sources import ModelSources

BASE_ADAPTER_NAME = "__base__"  # peft's name for "no adapter" in a mixed batch
MODEL_ADAPTER_NAME = "default"


def attach_adapters(model: Any, sources: ModelSources, quantization: Quantization) -> tuple[Any, bool]:
    """The model with its adapters, and whether MODEL_PATH's adapter was merged into the weights."""
    if sources.adapter is None and not sources.extra:
        return model, False
    from peft import PeftModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if sources.adapter is not None:
            wrapped = PeftModel.from_pretrained(
                model, str(sources.adapter.local_dir), adapter_name=MODEL_ADAPTER_NAME, is_trainable=False
            )
            if quantization == "none":
                return wrapped.merge_and_unload(), True
            return wrapped, False
        (first, first_weights), *rest = sources.extra.items()
        wrapped = PeftModel.from_pretrained(
            model, str(first_weights.local_dir), adapter_name=first, is_trainable=False
        )
        for name, weights in rest:
            wrapped.load_adapter(str(weights.local_dir), adapter_name=name, is_trainable=False)
    return wrapped, False
