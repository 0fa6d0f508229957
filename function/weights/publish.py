"""`python -m function publish-model LOCAL_DIR s3://bucket/prefix`: put a model where a cold start reads it.

It refuses pickle files and custom code, uploads every file with parallel multipart transfers and
a progress bar, writes the manifest of sizes and SHA-256 digests last (a cold start checks every
file against it), then verifies by fetching the prefix back through the same verified fetcher a
cold start uses, and prints the MODEL_PATH to deploy with.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from function.errors import ModelLoadError
from function.weights.fetcher import ModelFetcher
from function.weights.integrity import MANIFEST_NAME, PICKLE_SUFFIXES, build_manifest
from function.weights.resolve import check_model_files
from function.weights.s3 import parse_s3_uri, s3_client

MULTIPART_CHUNK = 16 * 1024 * 1024


@dataclass(frozen=True)
class PublishResult:
    model_path: str
    files: int
    bytes_total: int


class Progress:
    """A progress bar on a terminal (tqdm), plain percentage lines otherwise."""

    def __init__(self, total: int, out: TextIO, enabled: bool) -> None:
        self._lock = threading.Lock()
        self._bar: Any = None
        self._done, self._total, self._out, self._last = 0, total, out, -1
        if enabled and out.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, unit="B", unit_scale=True, desc="upload", file=out)
        self._enabled = enabled

    def __call__(self, transferred: int) -> None:
        with self._lock:
            self._done += transferred
            if self._bar is not None:
                self._bar.update(transferred)
            elif self._enabled:
                percent = 100 * self._done // max(1, self._total)
                if percent // 10 != self._last // 10:
                    self._last = percent
                    print(f"upload: {percent}% of {self._total / 1e6:.1f} MB", file=self._out, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def publish_model(
    local_dir: Path, uri: str, *, client: Any | None = None, out: TextIO = sys.stderr, progress: bool = True
) -> PublishResult:
    """Upload, write the manifest, verify; raise ModelLoadError with the reason when anything is off."""
    from boto3.s3.transfer import TransferConfig

    location = parse_s3_uri(uri)
    if not location.prefix:
        raise ModelLoadError(
            "publish to a prefix (s3://bucket/prefix/), not the bucket's root", field="model_path"
        )
    check_model_files(local_dir)
    pickles = sorted(p.name for p in local_dir.rglob("*") if p.is_file() and p.name.endswith(PICKLE_SUFFIXES))
    if pickles:
        raise ModelLoadError(
            "pickle files are refused (they can run code when loaded): "
            + ", ".join(pickles)
            + "; remove them or convert the weights to safetensors",
            field="model_path",
        )
    client = client or s3_client()
    manifest = build_manifest(local_dir)
    total = sum(entry["size"] for entry in manifest["files"].values())
    config = TransferConfig(
        multipart_threshold=MULTIPART_CHUNK, multipart_chunksize=MULTIPART_CHUNK, max_concurrency=8
    )
    bar = Progress(total, out, progress)
    try:
        with ThreadPoolExecutor(max_workers=4) as pool:
            uploads = [
                pool.submit(
                    client.upload_file,
                    str(local_dir / name),
                    location.bucket,
                    location.prefix + name,
                    Config=config,
                    Callback=bar,
                )
                for name in manifest["files"]
            ]
            for upload in uploads:
                upload.result()
    finally:
        bar.close()
    # Last: a prefix with a manifest is a complete publication.
    client.put_object(
        Bucket=location.bucket,
        Key=location.prefix + MANIFEST_NAME,
        Body=json.dumps(manifest, indent=1).encode(),
        ContentType="application/json",
    )
    model_path = f"s3://{location.bucket}/{location.prefix}"
    with tempfile.TemporaryDirectory(prefix="llm-function-verify-") as scratch:
        ModelFetcher(Path(scratch), client).fetch(model_path)  # every file against the manifest
    return PublishResult(model_path, len(manifest["files"]), total)
