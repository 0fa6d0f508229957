"""`make emulate-snapstart`: Lambda SnapStart on this machine, no Docker, no AWS account.

Publishes a model to SeaweedFS (S3) on 127.0.0.1, runs the SnapStart INIT once in a holder process
(AWS_LAMBDA_INITIALIZATION_TYPE=snap-start: weights straight into memory, load, warm-up, the
before-snapshot hooks), then restores environments by forking it, each behind the real Runtime
Interface Emulator (tests.support.snapstart). Each restored environment is invoked with /health and a
sampled /generate, and what the snapshot held is printed: the hooks, the open connections, the files
in the local cache (no weights).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from function.demo_model import build_demo_model
from tests.support.local_aws import SeaweedFS
from tests.support.s3 import upload_model
from tests.support.snapstart import SnapStartEmulation

BUCKET = "models"
PREFIX = "snapstart/final_model/"


def init_report_ms(log: str) -> float | None:
    """The emulator's `INIT REPORT(durationMs: …)`: from the runtime's start to its first /next."""
    match = re.search(r"INIT REPORT\(durationMs: ([\d.]+)\)", log)
    return float(match.group(1)) if match else None


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, help="model directory to publish (default: a new demo model)"
    )
    parser.add_argument("--restores", type=int, default=2, help="environments to restore (default 2)")
    parser.add_argument("--keep", action="store_true", help="stay up after the invocations, until Ctrl-C")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llm-function-snapstart-"))
    model_dir = args.model_dir or build_demo_model(root / "final_model")
    seaweed = SeaweedFS(root / "seaweedfs").start()
    client = seaweed.client()
    client.create_bucket(Bucket=BUCKET)
    upload_model(client, BUCKET, PREFIX, model_dir)
    cache = root / "tmp"
    environment = {
        **seaweed.environment(),
        "MODEL_PATH": f"s3://{BUCKET}/{PREFIX}",
        "MODEL_CACHE_DIR": str(cache),
    }
    emulation = SnapStartEmulation(environment, root)
    try:
        emulation.start()
        report = emulation.snapshot()
        print(f"INIT up to the snapshot: {emulation.init_seconds:.2f} s; log: {emulation.log_path}")
        print(f"  after-restore hooks: {report['after_restore_hooks']}; ran: {report['hooks_ran']}")
        print(f"  established TCP connections in the snapshot: {report['established_tcp'] or 'none'}")
        files = sorted(p for p in cache.rglob("*") if p.is_file() and ".locks" not in p.parts)
        print(
            f"  local cache: {len(files)} files, {sum(p.stat().st_size for p in files):,} bytes, "
            "no weights: " + ", ".join(p.name for p in files)
        )
        for index in range(args.restores):
            started = time.perf_counter()
            function = emulation.restore()
            health = function.invoke({"path": "/health", "method": "GET"})
            body = {"prompt": "Hello", "max_new_tokens": 12, "temperature": 1.0}
            answer = function.invoke({"path": "/generate", "method": "POST", "body": body})
            cold_start = function.invoke({"path": "/model_info", "method": "GET"})["body"]["cold_start"]
            print(
                f"restored environment {index}: /health {health['statusCode']}, /generate "
                f"{answer['statusCode']} in {time.perf_counter() - started:.2f} s from the restore: "
                f"{json.dumps(answer['body'].get('generated_text'), ensure_ascii=False)[:120]}"
            )
            print(
                f"  restore_s={cold_start['restore_s']} first_token_s={cold_start['first_token_s']} "
                f"emulator INIT {init_report_ms(function.log())} ms; log: {function.log_path}"
            )
        if args.keep:
            print("\nCtrl-C stops.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        emulation.stop()
        seaweed.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
