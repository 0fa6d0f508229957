"""`make emulate`: the Lambda function on this machine, no Docker, no AWS account.

Starts SeaweedFS (S3) on 127.0.0.1, publishes the demo model to it (or the model in MODEL_DIR),
runs the handler in the real Lambda Runtime Interface Emulator with MODEL_PATH=s3://…, invokes
every events/*.json and prints each answer. With --keep both stay up until Ctrl-C, and the
command to invoke the function yourself is printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from function.demo_model import build_demo_model
from tests.support.events import event_names, load_event
from tests.support.local_aws import LambdaEmulator, SeaweedFS
from tests.support.s3 import upload_model

BUCKET = "models"
PREFIX = "emulate/final_model/"


def summarize(response: object) -> str:
    text = json.dumps(response, ensure_ascii=False)
    return text if len(text) <= 300 else text[:297] + "..."


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--model-dir", type=Path, help="model directory to publish (default: a new demo model)"
    )
    parser.add_argument("--keep", action="store_true", help="stay up after the events, until Ctrl-C")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="llm-function-emulate-"))
    model_dir = args.model_dir or build_demo_model(root / "final_model")
    seaweed = SeaweedFS(root / "seaweedfs").start()
    client = seaweed.client()
    client.create_bucket(Bucket=BUCKET)
    upload_model(client, BUCKET, PREFIX, model_dir)
    uri = f"s3://{BUCKET}/{PREFIX}"
    print(f"S3 (SeaweedFS): {seaweed.endpoint}, model published to {uri}")
    environment = {**seaweed.environment(), "MODEL_PATH": uri, "MODEL_CACHE_DIR": str(root / "tmp")}
    function = LambdaEmulator(environment, root / "emulator.log").start()
    failures = 0
    try:
        for name in event_names():
            started = time.perf_counter()
            response = function.invoke(load_event(name))
            status = response.get("statusCode", "warmup") if isinstance(response, dict) else "?"
            failures += isinstance(status, int) and status >= 500
            print(f"{name:<45} {status!s:>7} {time.perf_counter() - started:6.2f}s  {summarize(response)}")
        print(f"init duration (emulator REPORT): {function.init_duration_ms()} ms; log: {function.log_path}")
        if args.keep:
            print(f"\ninvoke it:  curl -s -d @events/direct-generate.json {function.url}\nCtrl-C stops.")
            while True:
                time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        function.stop()
        seaweed.stop()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
