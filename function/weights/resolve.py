"""Resolve a model path into a local directory of loadable weights, and check what is in it.

`MODEL_PATH` is a local directory or `s3://bucket/prefix`. An `s3://` prefix is fetched into
the local cache by `function.weights.fetcher.ModelFetcher` (verified, reused while unchanged) and then
checked like a local directory. A directory holds a full model (`config.json`, tokenizer,
`*.safetensors`) or a PEFT adapter (`adapter_config.json`, `adapter_model.safetensors`).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal

from function.errors import ModelLoadError, ModelPathNotAllowedError
from function.weights.fetcher import FetchResult
from function.weights.integrity import PICKLE_SUFFIXES
from function.weights.memory import InMemoryWeights, fetch_into_memory
from function.weights.prefetch import fetch_model

CONVERT_HINT = (
    'Convert it once, on a machine you trust, with: python -c "from transformers import '
    "AutoModelForCausalLM as M; M.from_pretrained('IN_DIR').save_pretrained('OUT_DIR', "
    'safe_serialization=True)" and copy the tokenizer files beside it.'
)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# Any one of these is a tokenizer transformers can load (vocab.json needs merges.txt beside it).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
ModelKind = Literal["model", "adapter"]


@dataclass(frozen=True)
class ResolvedWeights:
    """A local directory holding a full model (config, tokenizer, safetensors) or a PEFT adapter."""

    local_dir: Path
    source: str
    name: str
    resolve_seconds: float
    fetch: FetchResult | None = None
    kind: ModelKind = "model"
    memory: InMemoryWeights | None = None  # safetensors fetched into memory (local_dir: the rest)


def model_name_from_path(model_path: str) -> str:
    """The directory's or the S3 prefix's last part: `s3://b/models/final_model/` -> `final_model`."""
    if model_path.startswith("s3://"):
        key = model_path[len("s3://") :].rstrip("/")
        return PurePosixPath(key).name or key
    return Path(model_path.rstrip("/\\")).name or model_path


def resolve_weights(
    model_path: str,
    cache_dir: Path,
    check_path: Callable[[str], None] | None = None,
    *,
    in_memory: bool = False,
) -> ResolvedWeights:
    """Turn `model_path` into a checked local directory (fetching `s3://` into `cache_dir`).

    `check_path` is /load_model's allow-list: there a link in a local directory may lead only into the
    directory or the allow-list. Without it (the start-up MODEL_PATH, the operator's own choice) links
    are followed, so a Hugging Face cache snapshot (files linked to ../../blobs) can be served."""
    started = time.perf_counter()
    if model_path.startswith("s3://"):
        memory = None
        if in_memory:
            fetched, memory = fetch_into_memory(model_path, cache_dir)
        else:
            fetched = fetch_model(model_path, cache_dir)
        kind = check_model_files(fetched.local_dir, memory.names if memory else set())
        return ResolvedWeights(
            fetched.local_dir,
            model_path,
            model_name_from_path(model_path),
            time.perf_counter() - started,
            fetched,
            kind,
            memory,
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
    if check_path is not None:
        check_links(local_dir, check_path)
    kind = check_model_files(local_dir)
    return ResolvedWeights(
        local_dir=local_dir.resolve(),
        source=model_path,
        name=model_name_from_path(model_path),
        resolve_seconds=time.perf_counter() - started,
        kind=kind,
    )


def check_links(local_dir: Path, check_path: Callable[[str], None] | None = None) -> None:
    """Every file of a local model directory lies inside it: a link that leads out (to weights outside
    ALLOWED_MODEL_PATHS, say) is refused, unless `check_path` (the allow-list) admits where it leads."""
    root = os.path.realpath(local_dir)
    for folder, folders, files in os.walk(root):  # links to folders are not followed: each is checked here
        for name in (*folders, *files):
            entry = os.path.join(folder, name)
            if not os.path.islink(entry):
                continue  # a plain entry of a folder walked from the root lies inside it
            target = os.path.realpath(entry)
            if os.path.commonpath([root, target]) == root or _admits(check_path, target):
                continue
            raise ModelLoadError(
                f"model file {os.path.relpath(entry, root)} is a link outside the model directory"
                + (" and outside ALLOWED_MODEL_PATHS" if check_path else "")
                + "; copy the file into the directory",
                field="model_path",
            )


def _admits(check_path: Callable[[str], None] | None, path: str) -> bool:
    if check_path is None:
        return False
    try:
        check_path(path)
    except ModelPathNotAllowedError:
        return False
    return True


def check_model_files(local_dir: Path, in_memory: set[str] | None = None) -> ModelKind:
    """A full model or a PEFT adapter, with safetensors weights; custom code and pickles are refused.
    `in_memory`: the names of files fetched into memory rather than into `local_dir`."""
    names = {p.name for p in local_dir.iterdir() if p.is_file()} | (in_memory or set())
    if "config.json" not in names and ADAPTER_CONFIG in names:
        check_adapter_files(local_dir, names)
        return "adapter"
    if "config.json" not in names:
        raise ModelLoadError(
            "model_path holds no config.json (a model) and no adapter_config.json (a PEFT adapter): "
            "not a transformers model directory",
            field="model_path",
        )
    for name in ("config.json", "tokenizer_config.json"):
        if _asks_for_custom_code(local_dir / name):
            raise ModelLoadError(
                f"the model's {name} asks for custom code (auto_map); this service never runs model code "
                "(trust_remote_code is off), so the model is refused",
                field="model_path",
            )
    if not any(name.endswith(".safetensors") for name in names):
        if any(name.endswith(PICKLE_SUFFIXES) for name in names):
            raise ModelLoadError(
                "the model's weights are a pickle checkpoint (.bin/.pt/.pkl), which can run code when "
                "loaded and is refused; only safetensors weights are served. " + CONVERT_HINT,
                field="model_path",
            )
        raise ModelLoadError("model_path holds no *.safetensors weights", field="model_path")
    if not has_tokenizer(names):
        raise ModelLoadError(
            "model_path holds no tokenizer files: expected tokenizer.json (or tokenizer.model, or "
            "vocab.json with merges.txt) beside config.json; save them with "
            "tokenizer.save_pretrained(MODEL_DIR)",
            field="model_path",
        )
    return "model"


def has_tokenizer(names: set[str]) -> bool:
    if "vocab.json" in names and "merges.txt" not in names and "tokenizer.json" not in names:
        return False
    return any(name in names for name in TOKENIZER_FILES)


def check_adapter_files(local_dir: Path, names: set[str]) -> None:
    if ADAPTER_WEIGHTS in names:
        return
    if "adapter_model.bin" in names:
        raise ModelLoadError(
            "the adapter's weights are a pickle (adapter_model.bin), which can run code when loaded and is "
            "refused; save the adapter with safe_serialization=True (adapter_model.safetensors)",
            field="model_path",
        )
    raise ModelLoadError(f"the adapter directory holds no {ADAPTER_WEIGHTS}", field="model_path")


def adapter_base(local_dir: Path) -> str | None:
    """The base model an adapter names (`base_model_name_or_path` in adapter_config.json)."""
    try:
        document = json.loads((local_dir / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(
            "the adapter's adapter_config.json is not valid JSON", field="model_path"
        ) from exc
    base = document.get("base_model_name_or_path") if isinstance(document, dict) else None
    return base if isinstance(base, str) and base else None


def _asks_for_custom_code(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False  # not ours to judge: from_pretrained reports an unreadable file
    return isinstance(document, dict) and "auto_map" in document
