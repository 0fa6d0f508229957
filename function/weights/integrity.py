"""What makes a model's files trustworthy: the publish manifest (sizes and SHA-256 digests), S3's
own checksums, and the refusal of pickle files (they can run code when loaded).
"""

from __future__ import annotations

import base64
import hashlib
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from function.errors import ModelLoadError

MANIFEST_NAME = "llm-function-manifest.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
Manifest = dict[str, dict[str, Any]]


def build_manifest(model_dir: Path) -> dict[str, Any]:
    """The manifest `publish-model` writes beside a model: every file's size and SHA-256."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    return {
        "format": 1,
        "files": {
            p.relative_to(model_dir).as_posix(): {
                "size": p.stat().st_size,
                "sha256": digest(p, hashlib.sha256),
            }
            for p in files
        },
    }


def parse_manifest(body: bytes, present: set[str]) -> Manifest:
    """The manifest's `files` map; every file it lists must be among `present`."""
    try:
        listed: Manifest = json.loads(body)["files"]
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelLoadError(
            "the model manifest is not valid JSON with a 'files' map", field="model_path"
        ) from exc
    missing = sorted(name for name in listed if name not in present)
    if missing:
        raise ModelLoadError(
            f"{len(missing)} file(s) listed in the manifest are missing from S3: " + ", ".join(missing[:5]),
            field="model_path",
        )
    return listed


def verify_against_manifest(name: str, path: Data, manifest: Manifest) -> None:
    """Size and SHA-256 as published. A file the manifest does not list (a README added later) passes."""
    entry = manifest.get(name)
    if entry is None:
        return
    size = _size(path)
    if int(entry.get("size", -1)) != size:
        raise ModelLoadError(
            f"{name}: size {size} differs from the manifest's {entry.get('size')} "
            "(truncated or replaced file)",
            field="model_path",
        )
    if digest(path, hashlib.sha256) != entry.get("sha256"):
        raise ModelLoadError(
            f"{name}: SHA-256 differs from the manifest (corrupt or tampered file)", field="model_path"
        )


def verify_s3_checksum(name: str, path: Data, head: dict[str, Any]) -> None:
    """The first full-object checksum S3 reports for the object (`head_object` with ChecksumMode)."""
    for field, compute in (
        ("ChecksumSHA256", sha256_b64),
        ("ChecksumCRC32", crc32_b64),
        ("ChecksumCRC32C", None),
        ("ChecksumSHA1", sha1_b64),
    ):
        expected = head.get(field)
        if not expected or "-" in str(expected) or compute is None:
            continue  # composite (multipart) checksums can't be checked without the part layout
        if compute(path) != expected:
            raise ModelLoadError(
                f"{name}: S3 {field.removeprefix('Checksum')} checksum mismatch (corrupt download)",
                field="model_path",
            )
        return


Data = Path | memoryview  # a file, or bytes already in memory (function.weights.memory)


def _chunks(data: Data) -> Iterator[Any]:
    if isinstance(data, memoryview):
        yield data
        return
    with open(data, "rb") as handle:
        yield from iter(lambda: handle.read(4 * 1024 * 1024), b"")


def _size(data: Data) -> int:
    return data.nbytes if isinstance(data, memoryview) else data.stat().st_size


def digest(data: Data, factory: Callable[[], Any]) -> str:
    hasher = factory()
    for chunk in _chunks(data):
        hasher.update(chunk)
    return str(hasher.hexdigest())


def sha256_b64(data: Data) -> str:
    return base64.b64encode(bytes.fromhex(digest(data, hashlib.sha256))).decode()


def sha1_b64(data: Data) -> str:
    return base64.b64encode(bytes.fromhex(digest(data, hashlib.sha1))).decode()


def crc32_b64(data: Data) -> str:
    crc = 0
    for chunk in _chunks(data):
        crc = zlib.crc32(chunk, crc)
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def verify_bytes(name: str, data: memoryview, manifest: Manifest | None, head: dict[str, Any] | None) -> None:
    """A file held in memory: against the manifest when there is one, else S3's checksum in `head`."""
    if manifest is not None:
        verify_against_manifest(name, data, manifest)
    elif head is not None:
        verify_s3_checksum(name, data, head)
