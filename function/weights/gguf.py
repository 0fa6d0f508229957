"""Convert a GGUF file (llama.cpp's format) into a safetensors model directory this service loads.

transformers reads GGUF and dequantizes it; `save_pretrained` refuses a model that still carries
the GGUF quantizer, so the model is rebuilt from its config and state dict (tied embeddings
kept) and saved in bfloat16 safetensors with the tokenizer, its chat template and the
generation config. Architectures transformers cannot read from GGUF are refused up front.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

from function.config import enforce_hub_offline
from function.errors import ModelLoadError

enforce_hub_offline()

GGUF_MAGIC = b"GGUF"


def gguf_architecture(path: Path) -> str:
    """The `general.architecture` a GGUF file declares (llama, qwen2, …)."""
    from gguf import GGUFReader

    field = GGUFReader(str(path)).fields.get("general.architecture")
    if field is None:
        raise ModelLoadError(f"{path.name} declares no general.architecture", field="gguf_file")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def supported_architectures() -> list[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return sorted(GGUF_SUPPORTED_ARCHITECTURES)


def check_gguf(path: Path) -> str:
    """The file's architecture, after checking that it is a GGUF file transformers can read."""
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file", field="gguf_file")
    with open(path, "rb") as handle:
        if handle.read(4) != GGUF_MAGIC:
            raise ModelLoadError(f"{path.name} is not a GGUF file (no GGUF magic)", field="gguf_file")
    architecture = gguf_architecture(path)
    supported = supported_architectures()
    if architecture not in supported:
        raise ModelLoadError(
            f"transformers cannot read the {architecture!r} architecture from GGUF; it reads: "
            + ", ".join(supported),
            field="gguf_file",
        )
    return architecture


def convert_gguf(gguf_path: Path, out_dir: Path, *, dtype: str = "bfloat16") -> Path:
    """Write `out_dir` (config, tokenizer, generation config, safetensors weights) from `gguf_path`.

    The directory appears complete or not at all: it is written beside its final place and renamed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = gguf_path.resolve()
    check_gguf(gguf_path)
    out_dir = out_dir.resolve()
    if out_dir.exists() and any(out_dir.iterdir()):
        raise ModelLoadError(f"{out_dir} exists and is not empty", field="out_dir")
    source: dict[str, Any] = {"gguf_file": gguf_path.name, "local_files_only": True}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **source)
            dequantized = AutoModelForCausalLM.from_pretrained(
                gguf_path.parent, dtype=torch.float32, **source
            )
    except Exception as exc:  # transformers and gguf raise many types for a file they can't read
        from function.weights.loading import safe_reason

        raise ModelLoadError(
            f"transformers could not read {gguf_path.name}: " + safe_reason(exc, gguf_path.parent),
            field="gguf_file",
        ) from exc
    config = dequantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the GGUF quantizer: save_pretrained refuses a model carrying it
    config.dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    missing, unexpected = model.load_state_dict(dequantized.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ModelLoadError(
            f"the GGUF weights do not match the {type(model).__name__} built from its config "
            f"(missing: {sorted(set(missing) - tied)[:5]}, unexpected: {sorted(unexpected)[:5]})",
            field="gguf_file",
        )
    model.tie_weights()
    model.generation_config = dequantized.generation_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if out_dir.exists():
            out_dir.rmdir()
        staging.rename(out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir
