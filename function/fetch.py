"""Fetch a model prefix from S3 into a local cache, fast and verified.

- Files download concurrently; large ones as parallel ranged GETs written in place.
- Each file is checked: against the publish manifest's SHA-256 when present, else its size and
  the S3 full-object checksum (CRC32, CRC32C, SHA-1 or SHA-256) when the object has one.
- The cache directory is keyed by the listing (keys, ETags, version ids, sizes): unchanged
  weights are never downloaded twice, also after an environment reset that keeps /tmp.
- Nothing partial ever looks complete: files are written as `*.part` and renamed after their
  check, a directory counts only with its completion marker, and leftovers are removed first.
- S3 access is boto3's own configuration (credentials chain, AWS_ENDPOINT_URL_S3).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from function.errors import ModelLoadError

logger = logging.getLogger(__name__)

MANIFEST_NAME = "llm-function-manifest.json"
COMPLETE_MARKER = ".complete"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
PART_SIZE = 8 * 1024 * 1024
MAX_WORKERS = 16
STREAM_ATTEMPTS = 4
BUCKET_NAME = re.compile(r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
CLIENT_ERRORS = {
    "NoSuchBucket": "the model bucket does not exist (NoSuchBucket)",
    "AccessDenied": "access to the model's S3 prefix was denied (AccessDenied): check the function's role",
    "403": "access to the model's S3 prefix was denied (403): check the function's role",
    "NoSuchKey": "a model file disappeared from S3 while it was being fetched (NoSuchKey)",
    "404": "a model file disappeared from S3 while it was being fetched (404)",
    "InvalidAccessKeyId": "the S3 credentials are not valid (InvalidAccessKeyId)",
    "SignatureDoesNotMatch": "the S3 credentials are not valid (SignatureDoesNotMatch)",
}


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or ending in "/"


@dataclass(frozen=True)
class RemoteFile:
    bucket: str
    key: str
    name: str  # path relative to the prefix
    size: int
    etag: str
    version_id: str | None = None


@dataclass(frozen=True)
class FetchResult:
    local_dir: Path
    files: int
    bytes_total: int
    bytes_downloaded: int
    seconds: float
    from_cache: bool

    @property
    def megabytes_per_second(self) -> float:
        return (
            self.bytes_downloaded / 1e6 / self.seconds if self.seconds > 0 and self.bytes_downloaded else 0.0
        )


def parse_s3_uri(uri: str) -> S3Location:
    """`s3://bucket/prefix` -> S3Location; no `..` or empty segments, a valid bucket name."""
    if not uri.startswith("s3://"):
        raise ModelLoadError("not an s3:// URI", field="model_path")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not BUCKET_NAME.match(bucket):
        raise ModelLoadError("the S3 bucket name is not valid", field="model_path")
    segments = [segment for segment in key.split("/") if segment]
    if any(segment in (".", "..") for segment in segments) or "//" in key or key.startswith("/"):
        raise ModelLoadError("the S3 prefix must not contain '.', '..' or empty segments", field="model_path")
    return S3Location(bucket=bucket, prefix="/".join(segments) + "/" if segments else "")


def s3_client() -> Any:
    """boto3's own configuration, with retries on throttling, 5xx and connection errors."""
    import boto3
    from botocore.config import Config

    config = Config(
        retries={"max_attempts": 6, "mode": "standard"},
        max_pool_connections=MAX_WORKERS * 2,
        connect_timeout=5,
        read_timeout=30,
    )
    return boto3.client("s3", config=config)


def describe_client_error(exc: Exception) -> str:
    """A reason safe for /health: the S3 error code, never the bucket, key or credentials."""
    code = (
        str(getattr(exc, "response", {}).get("Error", {}).get("Code", "")) if hasattr(exc, "response") else ""
    )
    if code in CLIENT_ERRORS:
        return CLIENT_ERRORS[code]
    if code:
        return f"S3 answered {code} while fetching the model"
    return f"S3 could not be reached while fetching the model ({type(exc).__name__})"


class ModelFetcher:
    """Downloads one S3 prefix into `cache_root`, verified; see the module docstring."""

    def __init__(
        self,
        cache_root: Path,
        client: Any | None = None,
        *,
        part_size: int = PART_SIZE,
        max_workers: int = MAX_WORKERS,
        reserve_bytes: int = 0,
    ) -> None:
        self.cache_root = cache_root
        self._client = client
        self.part_size = part_size
        self.max_workers = max_workers
        self.reserve_bytes = reserve_bytes

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = s3_client()
        return self._client

    def fetch(self, uri: str) -> FetchResult:
        location = parse_s3_uri(uri)
        started = time.perf_counter()
        try:
            return self._fetch(location, started)
        except ModelLoadError:
            raise
        except Exception as exc:  # botocore raises many types; all become one clear reason
            logger.warning("model fetch failed: %s", type(exc).__name__, exc_info=True)
            raise ModelLoadError(describe_client_error(exc), field="model_path") from exc

    def _fetch(self, location: S3Location, started: float) -> FetchResult:
        files = self._list(location)
        skipped = [f.name for f in files if f.name.endswith(PICKLE_SUFFIXES)]
        if skipped:
            logger.warning("pickle files are never fetched: %s", ", ".join(sorted(skipped)))
        files = [f for f in files if not f.name.endswith(PICKLE_SUFFIXES)]
        if not any(f.name.endswith(".safetensors") for f in files):
            raise ModelLoadError(
                "the S3 prefix holds no *.safetensors weights"
                + (
                    " (pickle checkpoints are refused; convert to safetensors and publish again)"
                    if skipped
                    else ""
                ),
                field="model_path",
            )
        target = self.cache_root / _cache_key(location, files)
        self._remove_leftovers(keep=target)
        total = sum(f.size for f in files)
        if (target / COMPLETE_MARKER).is_file():
            return FetchResult(target, len(files), total, 0, time.perf_counter() - started, True)
        # Files already in place were verified before their rename (an init cut short by Lambda's
        # 10 s limit, say): only the rest is fetched. The marker still comes last.
        pending = [f for f in files if not (target / f.name).is_file()]
        needed = sum(f.size for f in pending)
        self._check_space(needed)
        target.mkdir(parents=True, exist_ok=True)
        try:
            self._download_all(location, files, pending, target)
        except BaseException:
            shutil.rmtree(target, ignore_errors=True)  # nothing partial stays behind
            raise
        (target / COMPLETE_MARKER).write_text(
            json.dumps({"files": len(files), "bytes": total}), encoding="utf-8"
        )
        return FetchResult(target, len(files), total, needed, time.perf_counter() - started, False)

    def _download_all(
        self, location: S3Location, files: list[RemoteFile], pending: list[RemoteFile], target: Path
    ) -> None:
        manifest = self._manifest(location, files)
        # One flat pool over every byte range of every file: small files and the parts of large ones
        # all proceed at once. Then each file is verified (in parallel) and renamed into place.
        tasks = [(f, first, last) for f in pending for first, last in self._ranges(f, target)]
        with ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="fetch") as pool:
            for _ in pool.map(lambda task: self._download_range(task[0], target, task[1], task[2]), tasks):
                pass
            for _ in pool.map(lambda f: self._verify_and_place(f, target, manifest), pending):
                pass

    def _list(self, location: S3Location) -> list[RemoteFile]:
        files: list[RemoteFile] = []
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=location.bucket, Prefix=location.prefix):
            for item in page.get("Contents", []):
                name = item["Key"][len(location.prefix) :]
                if not name or name.endswith("/"):
                    continue
                parts = PurePosixPath(name).parts
                if any(part in (".", "..") for part in parts):
                    raise ModelLoadError(
                        "an S3 key under the prefix has '.' or '..' segments", field="model_path"
                    )
                files.append(
                    RemoteFile(
                        location.bucket,
                        item["Key"],
                        name,
                        int(item["Size"]),
                        str(item.get("ETag", "")).strip('"'),
                    )
                )
        if not files:
            raise ModelLoadError("no model files were found under the S3 prefix", field="model_path")
        return files

    def _manifest(self, location: S3Location, files: list[RemoteFile]) -> dict[str, dict[str, Any]] | None:
        entry = next((f for f in files if f.name == MANIFEST_NAME), None)
        if entry is None:
            return None
        body = self.client.get_object(Bucket=location.bucket, Key=entry.key)["Body"].read()
        try:
            listed: dict[str, dict[str, Any]] = json.loads(body)["files"]
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(
                "the model manifest is not valid JSON with a 'files' map", field="model_path"
            ) from exc
        present = {f.name for f in files}
        missing = sorted(name for name in listed if name not in present)
        if missing:
            raise ModelLoadError(
                f"{len(missing)} file(s) listed in the manifest are missing from S3: "
                + ", ".join(missing[:5]),
                field="model_path",
            )
        return listed

    def _check_space(self, needed: int) -> None:
        self.cache_root.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(self.cache_root).free
        if free < needed + self.reserve_bytes:
            raise ModelLoadError(
                f"not enough space for the model in the cache directory: it needs {needed / 1e6:.0f} MB, "
                f"{free / 1e6:.0f} MB are free; raise the function's ephemeral storage",
                field="model_path",
            )

    def _remove_leftovers(self, keep: Path) -> None:
        """Partial downloads and older versions of this prefix go first; other models' complete caches stay
        (a failed load of another model must not cost the serving one its cache)."""
        if not self.cache_root.is_dir():
            return
        same_prefix = keep.name.split("-", 1)[0] + "-"
        for entry in self.cache_root.iterdir():
            if entry == keep:
                continue
            if not entry.is_dir():
                entry.unlink(missing_ok=True)
            elif entry.name.startswith(same_prefix) or not (entry / COMPLETE_MARKER).is_file():
                shutil.rmtree(entry, ignore_errors=True)
        if keep.is_dir():
            for part in keep.rglob("*.part"):
                part.unlink(missing_ok=True)

    def _ranges(self, remote: RemoteFile, target: Path) -> list[tuple[int, int]]:
        """Create the file's `.part` at full size and split it into ranges of `part_size`."""
        part_file = _partial_path(target, remote)
        part_file.parent.mkdir(parents=True, exist_ok=True)
        with open(part_file, "wb") as handle:
            handle.truncate(remote.size)
        if remote.size == 0:
            return [(0, -1)]
        return [
            (start, min(start + self.part_size, remote.size) - 1)
            for start in range(0, remote.size, self.part_size)
        ]

    def _verify_and_place(
        self, remote: RemoteFile, target: Path, manifest: dict[str, dict[str, Any]] | None
    ) -> None:
        part_file = _partial_path(target, remote)
        self._verify(remote, part_file, manifest)
        os.replace(part_file, target / remote.name)

    def _download_range(self, remote: RemoteFile, target: Path, first: int, last: int) -> None:
        """GET one byte range into place; a stream cut mid-body is retried from its start."""
        path = _partial_path(target, remote)
        for attempt in range(STREAM_ATTEMPTS):
            try:
                # If-Match: every part comes from the same object version, or the fetch fails clearly.
                extra: dict[str, Any] = {"IfMatch": f'"{remote.etag}"'} if remote.etag else {}
                if last >= first:
                    extra["Range"] = f"bytes={first}-{last}"
                body = self.client.get_object(Bucket=remote.bucket, Key=remote.key, **extra)["Body"]
                with open(path, "r+b") as handle:
                    handle.seek(first)
                    written = 0
                    for chunk in iter(partial(body.read, 1024 * 1024), b""):
                        handle.write(chunk)
                        written += len(chunk)
                expected = (last - first + 1) if last >= first else remote.size
                if written != expected:
                    raise ModelLoadError(
                        f"{remote.name}: S3 returned {written} bytes where {expected} were "
                        "expected (truncated object)",
                        field="model_path",
                    )
                return
            except ModelLoadError:
                raise
            except Exception as exc:
                if _client_error_code(exc) or attempt == STREAM_ATTEMPTS - 1:
                    raise
                time.sleep(min(2.0, 0.1 * 2**attempt))

    def _verify(self, remote: RemoteFile, path: Path, manifest: dict[str, dict[str, Any]] | None) -> None:
        size = path.stat().st_size
        if size != remote.size:
            raise ModelLoadError(
                f"{remote.name}: {size} bytes on disk, {remote.size} listed", field="model_path"
            )
        if manifest is not None and remote.name != MANIFEST_NAME:
            entry = manifest.get(remote.name)
            if entry is None:
                return  # not part of the published model (e.g. a README added later): not verified
            if int(entry.get("size", -1)) != size:
                raise ModelLoadError(
                    f"{remote.name}: size {size} differs from the manifest's {entry.get('size')}"
                    " (truncated or replaced file)",
                    field="model_path",
                )
            if _digest(path, hashlib.sha256) != entry.get("sha256"):
                raise ModelLoadError(
                    f"{remote.name}: SHA-256 differs from the manifest (corrupt or tampered file)",
                    field="model_path",
                )
            return
        if manifest is None:
            self._verify_s3_checksum(remote, path)

    def _verify_s3_checksum(self, remote: RemoteFile, path: Path) -> None:
        head = self.client.head_object(Bucket=remote.bucket, Key=remote.key, ChecksumMode="ENABLED")
        for field, compute in (
            ("ChecksumSHA256", _sha256_b64),
            ("ChecksumCRC32", _crc32_b64),
            ("ChecksumCRC32C", None),
            ("ChecksumSHA1", _sha1_b64),
        ):
            expected = head.get(field)
            if not expected or "-" in str(expected) or compute is None:
                continue  # composite (multipart) checksums can't be checked without the part layout
            if compute(path) != expected:
                raise ModelLoadError(
                    f"{remote.name}: S3 {field.removeprefix('Checksum')} checksum mismatch "
                    "(corrupt download)",
                    field="model_path",
                )
            return


_prefetches: dict[tuple[str, Path], subprocess.Popen[str]] = {}
_prefetch_lock = threading.Lock()


def prefetch(uri: str, cache_root: Path) -> None:
    """Start fetching `uri` in a child process (own interpreter, own core), to overlap the imports.

    The Lambda entry calls this before importing torch; `fetch_model` later takes the result.
    """
    with _prefetch_lock:
        if (uri, cache_root) not in _prefetches:
            _prefetches[(uri, cache_root)] = subprocess.Popen(
                [sys.executable, "-m", "function.fetch", uri, str(cache_root)],
                stdout=subprocess.PIPE,
                text=True,
            )


def fetch_model(uri: str, cache_root: Path) -> FetchResult:
    """The prefetch's result when one was started (once: a retry fetches anew), else a fetch now.

    A failed prefetch is not trusted for its reason: the fetch runs again here, and raises it.
    """
    with _prefetch_lock:
        child = _prefetches.pop((uri, cache_root), None)
    if child is not None:
        output, _ = child.communicate()
        if child.returncode == 0:
            fields = json.loads(output.strip().splitlines()[-1])
            return FetchResult(**{**fields, "local_dir": Path(fields["local_dir"])})
    return ModelFetcher(cache_root).fetch(uri)


def build_manifest(model_dir: Path) -> dict[str, Any]:
    """The manifest `publish-model` writes beside a model: every file's size and SHA-256."""
    files = sorted(p for p in model_dir.rglob("*") if p.is_file() and p.name != MANIFEST_NAME)
    return {
        "format": 1,
        "files": {
            p.relative_to(model_dir).as_posix(): {
                "size": p.stat().st_size,
                "sha256": _digest(p, hashlib.sha256),
            }
            for p in files
        },
    }


def _partial_path(target: Path, remote: RemoteFile) -> Path:
    final = target / remote.name
    return final.with_name(final.name + ".part")


def _client_error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _cache_key(location: S3Location, files: list[RemoteFile]) -> str:
    identity = hashlib.sha256(f"{location.bucket}/{location.prefix}".encode()).hexdigest()[:12]
    listing = json.dumps(sorted((f.name, f.etag, f.version_id or "", f.size) for f in files))
    return f"{identity}-{hashlib.sha256(listing.encode()).hexdigest()[:16]}"


def _digest(path: Path, factory: Callable[[], Any]) -> str:
    hasher = factory()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(4 * 1024 * 1024), b""):
            hasher.update(chunk)
    return str(hasher.hexdigest())


def _sha256_b64(path: Path) -> str:
    return base64.b64encode(bytes.fromhex(_digest(path, hashlib.sha256))).decode()


def _sha1_b64(path: Path) -> str:
    return base64.b64encode(bytes.fromhex(_digest(path, hashlib.sha1))).decode()


def _crc32_b64(path: Path) -> str:
    crc = 0
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(4 * 1024 * 1024), b""):
            crc = zlib.crc32(chunk, crc)
    return base64.b64encode(crc.to_bytes(4, "big")).decode()


def main(argv: list[str]) -> int:
    """`python -m function.fetch s3://bucket/prefix CACHE_DIR`: fetch, print the result as JSON."""
    if len(argv) != 2:
        print("usage: python -m function.fetch s3://bucket/prefix CACHE_DIR", file=sys.stderr)
        return 2
    try:
        result = ModelFetcher(Path(argv[1])).fetch(argv[0])
    except ModelLoadError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    print(json.dumps({**asdict(result), "local_dir": str(result.local_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
