"""Fetch a model prefix from S3 into a local cache, fast and verified.

- Files download concurrently; large ones as parallel ranged GETs written in place.
- Each file is checked: against the publish manifest's SHA-256 when present, else its size and
  the S3 full-object checksum (CRC32, CRC32C, SHA-1 or SHA-256) when the object has one.
- The cache directory is keyed by the listing (keys, ETags, version ids, sizes): unchanged
  weights are never downloaded twice, also after an environment reset that keeps /tmp.
- Nothing partial ever looks complete: files are written as `*.part` and renamed after their
  check, a directory counts only with its completion marker, and leftovers are removed first.
- Space is checked up front, counting what other fetches of this process have yet to write (their
  `.part` files are sparse until written); a disk that fills up anyway is reported as such.
- S3 access is boto3's own configuration (credentials chain, AWS_ENDPOINT_URL_S3).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any

from function.errors import ModelLoadError
from function.weights.integrity import (
    MANIFEST_NAME,
    PICKLE_SUFFIXES,
    Manifest,
    parse_manifest,
    verify_against_manifest,
    verify_s3_checksum,
)
from function.weights.s3 import S3Location, client_error_code, describe_client_error, parse_s3_uri, s3_client
from function.weights.space import SPACE, Reservation, is_no_space, no_space_error

logger = logging.getLogger(__name__)

COMPLETE_MARKER = ".complete"
LOCKS_DIR = ".locks"  # empty lock files, one per cache directory: never data, never removed
PART_SIZE = 8 * 1024 * 1024
MAX_WORKERS = 16
STREAM_ATTEMPTS = 4


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
    in_memory: bool = False  # the safetensors went to memory, not to local_dir (function.weights.memory)

    @property
    def megabytes_per_second(self) -> float:
        return (
            self.bytes_downloaded / 1e6 / self.seconds if self.seconds > 0 and self.bytes_downloaded else 0.0
        )


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
            if is_no_space(exc):  # creating the lock or the directory, say
                raise no_space_error(None) from exc
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
        with cache_lock(target):  # one fetch of this listing at a time, across threads and processes
            return self._fetch_into(location, files, target, started)

    def _fetch_into(
        self, location: S3Location, files: list[RemoteFile], target: Path, started: float
    ) -> FetchResult:
        self._remove_leftovers(keep=target)
        total = sum(f.size for f in files)
        if (target / COMPLETE_MARKER).is_file():
            return FetchResult(target, len(files), total, 0, time.perf_counter() - started, True)
        # Files already in place were verified before their rename (an init cut short by Lambda's
        # 10 s limit, say): only the rest is fetched. The marker still comes last.
        pending = [f for f in files if not (target / f.name).is_file()]
        needed = sum(f.size for f in pending)
        with self._reserve(needed) as reservation:
            try:
                target.mkdir(parents=True, exist_ok=True)
                self._download_all(location, files, pending, target, reservation)
                (target / COMPLETE_MARKER).write_text(
                    json.dumps({"files": len(files), "bytes": total}), encoding="utf-8"
                )
            except BaseException as exc:
                shutil.rmtree(target, ignore_errors=True)  # nothing partial stays behind
                if is_no_space(exc):
                    raise no_space_error(needed) from exc
                raise
        return FetchResult(target, len(files), total, needed, time.perf_counter() - started, False)

    def _download_all(
        self,
        location: S3Location,
        files: list[RemoteFile],
        pending: list[RemoteFile],
        target: Path,
        reservation: Reservation,
    ) -> None:
        manifest = self._manifest(location, files)
        # One flat pool over every byte range of every file: small files and the parts of large ones
        # all proceed at once. Then each file is verified (in parallel) and renamed into place.
        tasks = [(f, first, last) for f in pending for first, last in self._ranges(f, target)]
        with ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="fetch") as pool:
            download = partial(self._download_range, target=target, reservation=reservation)
            for _ in pool.map(lambda task: download(task[0], first=task[1], last=task[2]), tasks):
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

    def _manifest(self, location: S3Location, files: list[RemoteFile]) -> Manifest | None:
        entry = next((f for f in files if f.name == MANIFEST_NAME), None)
        if entry is None:
            return None
        body = self.client.get_object(Bucket=location.bucket, Key=entry.key)["Body"].read()
        return parse_manifest(body, {f.name for f in files})

    def free_bytes(self) -> int:
        """Free space in the cache directory's filesystem."""
        return shutil.disk_usage(self.cache_root).free

    @contextmanager
    def _reserve(self, needed: int) -> Iterator[Reservation]:
        """Hold `needed` bytes against the free space until the fetch ends, or refuse the fetch now."""
        self.cache_root.mkdir(parents=True, exist_ok=True)
        reservation = SPACE.reserve(
            os.stat(self.cache_root).st_dev, needed, self.free_bytes, self.reserve_bytes
        )
        try:
            yield reservation
        finally:
            SPACE.release(reservation)

    def _remove_leftovers(self, keep: Path) -> None:
        """Partial downloads and older versions of this prefix go first; other models' complete caches stay
        (a failed load of another model must not cost the serving one its cache)."""
        if not self.cache_root.is_dir():
            return
        same_prefix = keep.name.split("-", 1)[0] + "-"
        for entry in self.cache_root.iterdir():
            if entry == keep or entry.name == LOCKS_DIR:
                continue
            if not entry.is_dir():
                entry.unlink(missing_ok=True)
            elif self._leftover(entry, same_prefix):
                with cache_lock(entry, wait=False) as free:
                    # A fetch in progress (this process or another) keeps its directory; one that
                    # completed it between the look above and the lock keeps it too (asked again).
                    if free and self._leftover(entry, same_prefix):
                        shutil.rmtree(entry, ignore_errors=True)
        if keep.is_dir():
            for part in keep.rglob("*.part"):
                part.unlink(missing_ok=True)

    @staticmethod
    def _leftover(entry: Path, same_prefix: str) -> bool:
        """An older version of this prefix, or a directory no fetch completed."""
        return entry.name.startswith(same_prefix) or not (entry / COMPLETE_MARKER).is_file()

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

    def _verify_and_place(self, remote: RemoteFile, target: Path, manifest: Manifest | None) -> None:
        part_file = _partial_path(target, remote)
        self._verify(remote, part_file, manifest)
        os.replace(part_file, target / remote.name)

    def _download_range(
        self, remote: RemoteFile, *, target: Path, first: int, last: int, reservation: Reservation
    ) -> None:
        """GET one byte range into its place in the `.part` file."""
        path = _partial_path(target, remote)

        def write(body: Any) -> int:
            with open(path, "r+b") as handle:
                handle.seek(first)
                written = 0
                for chunk in iter(partial(body.read, 1024 * 1024), b""):
                    self._write_chunk(handle, chunk)
                    SPACE.written(reservation, len(chunk))
                    written += len(chunk)
            return written

        self._get_range(remote, first, last, write)

    def _get_range(self, remote: RemoteFile, first: int, last: int, consume: Callable[[Any], int]) -> None:
        """GET one byte range (the whole object when `last < first`) and hand its body to `consume`, which
        returns the bytes it took. A stream cut mid-body is retried from the range's start; a body of
        another length than asked is an error."""
        expected = (last - first + 1) if last >= first else remote.size
        for attempt in range(STREAM_ATTEMPTS):
            try:
                # If-Match: every part comes from the same object version, or the fetch fails clearly.
                extra: dict[str, Any] = {"IfMatch": f'"{remote.etag}"'} if remote.etag else {}
                if last >= first:
                    extra["Range"] = f"bytes={first}-{last}"
                body = self.client.get_object(Bucket=remote.bucket, Key=remote.key, **extra)["Body"]
                received = consume(body)
                if received != expected:
                    raise ModelLoadError(
                        f"{remote.name}: S3 returned {received} bytes where {expected} were "
                        "expected (truncated object)",
                        field="model_path",
                    )
                return
            except ModelLoadError:
                raise
            except Exception as exc:
                if client_error_code(exc) or is_no_space(exc) or attempt == STREAM_ATTEMPTS - 1:
                    raise
                time.sleep(min(2.0, 0.1 * 2**attempt))

    def _write_chunk(self, handle: Any, chunk: bytes) -> None:
        """Every downloaded byte is written here."""
        handle.write(chunk)

    def _verify(self, remote: RemoteFile, path: Path, manifest: Manifest | None) -> None:
        size = path.stat().st_size
        if size != remote.size:
            raise ModelLoadError(
                f"{remote.name}: {size} bytes on disk, {remote.size} listed", field="model_path"
            )
        if manifest is None:
            head = self.client.head_object(Bucket=remote.bucket, Key=remote.key, ChecksumMode="ENABLED")
            verify_s3_checksum(remote.name, path, head)
        elif remote.name != MANIFEST_NAME:
            verify_against_manifest(remote.name, path, manifest)


@contextmanager
def cache_lock(target: Path, *, wait: bool = True) -> Iterator[bool]:
    """An exclusive lock on one cache directory (`flock` on `.locks/<dir>.lock` beside it), held while it is
    fetched: a second fetch of the same listing waits and then finds it complete, and cleanup never
    removes a directory another fetch is writing. Yields whether the lock was taken (`wait=False`)."""
    locks = target.parent / LOCKS_DIR
    locks.mkdir(parents=True, exist_ok=True)
    with open(locks / f"{target.name}.lock", "a+b") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _partial_path(target: Path, remote: RemoteFile) -> Path:
    final = target / remote.name
    return final.with_name(final.name + ".part")


def _cache_key(location: S3Location, files: list[RemoteFile]) -> str:
    identity = hashlib.sha256(f"{location.bucket}/{location.prefix}".encode()).hexdigest()[:12]
    listing = json.dumps(sorted((f.name, f.etag, f.version_id or "", f.size) for f in files))
    return f"{identity}-{hashlib.sha256(listing.encode()).hexdigest()[:16]}"
