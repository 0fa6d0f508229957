"""Resolve a model path into a local directory of loadable weights, and check what is in it.

`MODEL_PATH` is a local directory or `s3://bucket/prefix`. Local directories work here; the
`s3://` branch is the seam the Lambda cold-start fetcher fills (it will download the prefix to
a local cache and return the same `ResolvedWeights`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from function.errors import ModelLoadError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
CONVERT_HINT = (
    'Convert it once, on a machine you trust, with: python -c "from transformers import '
    "AutoModelForCausalLM as M; M.from_pretrained('IN_DIR').save_pretrained('OUT_DIR', "
    'safe_serialization=True)" and copy the tokenizer files beside it.'
)


@dataclass(frozen=True)
class ResolvedWeights:
    """A local directory holding config, tokenizer and safetensors weights."""

    local_dir: Path
    source: str
    name: str
    resolve_seconds: float


def model_name_from_path(model_path: str) -> str:
    """The directory's or the S3 prefix's last part: `s3://b/models/final_model/` -> `final_model`."""
    if model_path.startswith("s3://"):
        key = model_path[len("s3://") :].rstrip("/")
        return PurePosixPath(key).name or key
    return Path(model_path.rstrip("/\\")).name or model_path


def resolve_weights(model_path: str) -> ResolvedWeights:
    """Turn `model_path` into a checked local directory, or raise `ModelLoadError`."""
    started = time.perf_counter()
    if model_path.startswith("s3://"):
        raise ModelLoadError(
            "s3:// model paths need the S3 cold-start fetcher, which this build does not include yet; "
            "use a local directory",
            field="model_path",
        )
    if "://" in model_path:
        raise ModelLoadError(
            "model_path must be a local directory or s3://bucket/prefix; other URL schemes are refused",
            field="model_path",
        )
    local_dir = Path(model_path).expanduser()
    if not local_dir.is_dir():
        raise ModelLoadError(
            "model_path is not an existing directory "
            "(model hub ids are not fetched: this service is offline)",
            field="model_path",
        )
    check_model_files(local_dir)
    return ResolvedWeights(
        local_dir=local_dir.resolve(),
        source=model_path,
        name=model_name_from_path(model_path),
        resolve_seconds=time.perf_counter() - started,
    )


def check_model_files(local_dir: Path) -> None:
    """Require a config and safetensors weights; refuse pickle-only checkpoints with a way out."""
    if not (local_dir / "config.json").is_file():
        raise ModelLoadError(
            "model_path holds no config.json: not a transformers model directory", field="model_path"
        )
    names = [p.name for p in local_dir.iterdir() if p.is_file()]
    if any(name.endswith(".safetensors") for name in names):
        return
    if any(name.endswith(PICKLE_SUFFIXES) for name in names):
        raise ModelLoadError(
            "the model's weights are a pickle checkpoint (.bin/.pt/.pkl), which can run code when loaded "
            "and is refused; only safetensors weights are served. " + CONVERT_HINT,
            field="model_path",
        )
    raise ModelLoadError("model_path holds no *.safetensors weights", field="model_path")
