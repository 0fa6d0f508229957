"""Resolve a model path into a local directory of loadable weights, and check what is in it.

`MODEL_PATH` is a local directory or `s3://bucket/prefix`. An `s3://` prefix is fetched into
the local cache by `function.weights.fetcher.ModelFetcher` (verified, reused while unchanged) and then
checked like a local directory.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from function.errors import ModelLoadError
from function.weights.fetcher import FetchResult
from function.weights.integrity import PICKLE_SUFFIXES
from function.weights.prefetch import fetch_model

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
    fetch: FetchResult | None = None


def model_name_from_path(model_path: str) -> str:
    """The directory's or the S3 prefix's last part: `s3://b/models/final_model/` -> `final_model`."""
    if model_path.startswith("s3://"):
        key = model_path[len("s3://") :].rstrip("/")
        return PurePosixPath(key).name or key
    return Path(model_path.rstrip("/\\")).name or model_path


def resolve_weights(model_path: str, cache_dir: Path) -> ResolvedWeights:
    """Turn `model_path` into a checked local directory (fetching `s3://` into `cache_dir`)."""
    started = time.perf_counter()
    if model_path.startswith("s3://"):
        fetched = fetch_model(model_path, cache_dir)
        check_model_files(fetched.local_dir)
        return ResolvedWeights(
            fetched.local_dir,
            model_path,
            model_name_from_path(model_path),
            time.perf_counter() - started,
            fetched,
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
    """Require a config and safetensors weights; refuse custom code and pickle-only checkpoints."""
    if not (local_dir / "config.json").is_file():
        raise ModelLoadError(
            "model_path holds no config.json: not a transformers model directory", field="model_path"
        )
    for name in ("config.json", "tokenizer_config.json"):
        if _asks_for_custom_code(local_dir / name):
            raise ModelLoadError(
                f"the model's {name} asks for custom code (auto_map); this service never runs model code "
                "(trust_remote_code is off), so the model is refused",
                field="model_path",
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


def _asks_for_custom_code(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # not ours to judge: from_pretrained reports an unreadable file
    return isinstance(document, dict) and "auto_map" in document
