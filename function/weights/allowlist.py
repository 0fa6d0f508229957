"""Which model paths /load_model may load: ALLOWED_MODEL_PATHS, checked before any I/O.

Entries are local directories and `s3://bucket/prefix/`; by default, the parent of the start-up
MODEL_PATH. A candidate matches when it lies inside an entry by whole path components, after
normalization: `os.path.realpath` for local paths (symlinks and `..` resolved), and for S3 keys
no `.`/`..`/empty segments at all. Other URL schemes, percent-encoded paths and hub ids are refused.
"""

from __future__ import annotations

import os
import posixpath
from pathlib import Path
from urllib.parse import unquote

from function.errors import ModelLoadError, ModelPathNotAllowedError
from function.weights.s3 import parse_s3_uri


def default_allowed_paths(startup_model_path: str | None) -> list[str]:
    """The start-up model's parent: its siblings may be loaded, nothing else."""
    if not startup_model_path:
        return []
    if startup_model_path.startswith("s3://"):
        location = parse_s3_uri(startup_model_path)
        parent = posixpath.dirname(location.prefix.rstrip("/"))
        return [f"s3://{location.bucket}/{parent + '/' if parent else ''}"]
    return [os.path.dirname(os.path.realpath(startup_model_path.rstrip("/")))]


def check_model_path(candidate: str, allowed: list[str]) -> None:
    """Raise ModelPathNotAllowedError unless `candidate` lies inside an allowed entry."""
    refusal = ModelPathNotAllowedError(
        "model_path is not inside ALLOWED_MODEL_PATHS (local directories and s3:// prefixes this server "
        "may load from)",
        field="model_path",
    )
    if not allowed:
        raise ModelPathNotAllowedError(
            "runtime model loading is disabled: ALLOWED_MODEL_PATHS is empty", field="model_path"
        )
    if unquote(candidate) != candidate or "\0" in candidate:
        raise ModelPathNotAllowedError(
            "model_path must not be percent-encoded or contain NUL", field="model_path"
        )
    if candidate.startswith("s3://"):
        try:
            location = parse_s3_uri(candidate)
        except ModelLoadError as exc:
            raise ModelPathNotAllowedError(exc.message, field="model_path") from exc
        for entry in allowed:
            if entry.startswith("s3://"):
                allowed_s3 = parse_s3_uri(entry)
                if allowed_s3.bucket == location.bucket and location.prefix.startswith(allowed_s3.prefix):
                    return
        raise refusal
    if "://" in candidate or candidate.startswith("file:"):
        raise ModelPathNotAllowedError(
            "model_path must be a local directory or s3://bucket/prefix; other URL schemes are refused",
            field="model_path",
        )
    resolved = Path(os.path.realpath(candidate))
    for entry in allowed:
        if entry.startswith("s3://"):
            continue
        root = Path(os.path.realpath(entry))
        if resolved == root or root in resolved.parents:
            return
    raise refusal
