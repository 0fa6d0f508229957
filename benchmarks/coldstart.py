"""Cold start from S3, side by side in one run: `make bench-coldstart`. Prints figures; not a test.

A ~300 MB model is published to SeaweedFS on 127.0.0.1, then measured three ways:
- ours: the handler in the Lambda Runtime Interface Emulator, by phase (fresh /tmp each trial);
- the floor: imports + bytes / the best raw GET throughput of the same server;
- the common path: boto3 `download_file` of each file, then `from_pretrained`.
Targets: ours <= 1.15 x floor and <= 0.8 x common path; peak RSS <= RSS after imports + 1.1 x bytes.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from function.demo_model import DemoModelSize, build_demo_model
from tests.support.local_aws import CREDENTIALS, LambdaEmulator, SeaweedFS, peak_rss_mb
from tests.support.s3 import upload_model

BUCKET = "models"
PREFIX = "bench/model-300mb/"
SHAPE_300MB = DemoModelSize(
    hidden_size=768, num_layers=9, num_heads=12, intermediate_size=2048, vocab_size=8192
)

IMPORTS = """
import time
t = time.perf_counter()
import mangum, boto3, function.app
from function.weights.loading import import_runtime
import_runtime()
print(time.perf_counter() - t)
"""

COMMON_PATH = """
import json, resource, sys, time
from pathlib import Path
began = time.perf_counter()
import boto3, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
imported = time.perf_counter()
s3 = boto3.client("s3")
bucket, prefix, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
out.mkdir(parents=True, exist_ok=True)
for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
    s3.download_file(bucket, item["Key"], str(out / item["Key"][len(prefix):]))
downloaded = time.perf_counter()
AutoTokenizer.from_pretrained(out, local_files_only=True)
AutoModelForCausalLM.from_pretrained(out, local_files_only=True, dtype=torch.float32)
loaded = time.perf_counter()
print(json.dumps({"imports_s": imported - began, "download_s": downloaded - imported, "load_s": loaded - downloaded,
                  "total_s": loaded - began, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def raw_get_mb_per_s(seaweed: SeaweedFS, part_size: int = 8 * 1024 * 1024, workers: int = 16) -> float:
    """Every object under the prefix as parallel ranged GETs, bytes discarded: the server's ceiling."""
    client = seaweed.client()
    objects = client.list_objects_v2(Bucket=BUCKET, Prefix=PREFIX)["Contents"]
    ranges = [
        (o["Key"], start, min(start + part_size, o["Size"]) - 1)
        for o in objects
        for start in range(0, o["Size"], part_size)
    ]

    def get(job: tuple[str, int, int]) -> int:
        key, first, last = job
        body = client.get_object(Bucket=BUCKET, Key=key, Range=f"bytes={first}-{last}")["Body"]
        return sum(len(chunk) for chunk in iter(lambda: body.read(1024 * 1024), b""))

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        total = sum(pool.map(get, ranges))
    return total / 1e6 / (time.perf_counter() - started)


def fetch_to_tmp_mb_per_s(seaweed: SeaweedFS, root: Path, trial: int) -> float:
    """The fetcher alone (verify included) into a fresh /tmp: set against raw GETs, the cost of landing on disk."""
    from function.weights.fetcher import ModelFetcher

    result = ModelFetcher(root / f"alone-{trial}", seaweed.client()).fetch(f"s3://{BUCKET}/{PREFIX}")
    return result.megabytes_per_second


def ours(seaweed: SeaweedFS, root: Path, trial: int) -> dict[str, Any]:
    environment = {
        **seaweed.environment(),
        "MODEL_PATH": f"s3://{BUCKET}/{PREFIX}",
        "MODEL_CACHE_DIR": str(root / f"tmp-{trial}"),
        "CPU_DTYPE": "float32",
    }
    function = LambdaEmulator(environment, root / f"rie-{trial}.log", memory_mb=3008).start()
    try:
        started = time.perf_counter()
        info = function.invoke({"path": "/model_info", "method": "GET"})["body"]
        first_response_s = time.perf_counter() - started
        pid = function.runtime_pid()
        peak = peak_rss_mb(pid) if pid else float("nan")
    finally:
        function.stop()
    return {**info["cold_start"], "first_response_s": first_response_s, "peak_rss_mb": peak}


def common_path(root: Path, seaweed: SeaweedFS, trial: int) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", COMMON_PATH, BUCKET, PREFIX, str(root / f"common-{trial}")],
        capture_output=True,
        text=True,
        check=True,
        env={**seaweed.environment()},
    )
    parsed: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return parsed


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=3)
    args = parser.parse_args()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="llm-function-bench-"))
    model_dir = build_demo_model(root / "model-300mb", size=SHAPE_300MB)
    model_bytes = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    seaweed = SeaweedFS(root / "seaweedfs").start()
    try:
        client = seaweed.client()
        client.create_bucket(Bucket=BUCKET)
        upload_model(client, BUCKET, PREFIX, model_dir)
        raw = max(raw_get_mb_per_s(seaweed) for _ in range(3))
        to_tmp = max(fetch_to_tmp_mb_per_s(seaweed, root, trial) for trial in range(3))
        imports = min(
            float(
                subprocess.run(
                    [sys.executable, "-c", IMPORTS],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**CREDENTIALS},
                ).stdout
            )
            for _ in range(3)
        )
        runs = [ours(seaweed, root, trial) for trial in range(args.trials)]
        commons = [common_path(root, seaweed, trial) for trial in range(args.trials)]
    finally:
        seaweed.stop()
    report(model_bytes, raw, to_tmp, imports, runs, commons)
    return 0


def report(
    model_bytes: int,
    raw: float,
    to_tmp: float,
    imports: float,
    runs: list[dict[str, Any]],
    commons: list[dict[str, Any]],
) -> None:
    def median(rows: list[dict[str, Any]], key: str) -> float:
        return float(statistics.median(float(row[key]) for row in rows))

    floor = imports + model_bytes / 1e6 / raw
    ready = median(runs, "ready_s")
    common = median(commons, "total_s")
    rss_after_imports = median(runs, "rss_after_imports_mb")
    peak = median(runs, "peak_rss_mb")
    rss_limit = rss_after_imports + 1.1 * model_bytes / 2**20
    print(
        f"model: {model_bytes / 1e6:.0f} MB; best raw GET throughput: {raw:.0f} MB/s; imports alone: {imports:.2f} s"
    )
    print(
        f"fetch alone into /tmp, SHA-256 checked: {to_tmp:.0f} MB/s = {to_tmp / raw:.2f} x raw GETs into memory"
    )
    print(f"medians of {len(runs)} trials, each on a fresh /tmp")
    print(
        f"{'ours (emulator)':<22}imports {median(runs, 'imports_s'):.2f} s | fetch {median(runs, 'fetch_s'):.2f} s "
        f"({median(runs, 'fetch_mb_per_s'):.0f} MB/s, overlapping the imports) | load {median(runs, 'load_s'):.2f} s"
        f" | ready {ready:.2f} s | first response {median(runs, 'first_response_s'):.2f} s"
    )
    print(f"{'floor':<22}imports + bytes / raw = {floor:.2f} s")
    print(
        f"{'common path':<22}imports {median(commons, 'imports_s'):.2f} s | download_file "
        f"{median(commons, 'download_s'):.2f} s | from_pretrained {median(commons, 'load_s'):.2f} s | total "
        f"{common:.2f} s | peak RSS {median(commons, 'peak_rss_mb'):.0f} MB"
    )
    print(f"{'target':<22}{'measured':>10}{'limit':>10}  result")
    for name, value, limit in (
        ("ready / floor", ready / floor, 1.15),
        ("ready / common path", ready / common, 0.8),
        ("peak RSS MB", peak, rss_limit),
    ):
        print(f"{name:<22}{value:>10.2f}{limit:>10.2f}  {'met' if value <= limit else 'MISSED'}")
    print(
        f"(peak RSS limit = RSS after imports {rss_after_imports:.0f} MB + 1.1 x model {model_bytes / 2**20:.0f} MiB)"
    )


if __name__ == "__main__":
    sys.exit(main())
