"""Cold start from S3, side by side in one run: `make bench-coldstart`. Prints figures; not a test.

The example model (SmolLM2-135M-Instruct, ~270 MB of bf16 safetensors; built by `make example-model` if
missing) is published to SeaweedFS on 127.0.0.1 with its manifest, then each round runs, in an order that
rotates from round to round, every path in a fresh process:

1. time to a model ready to generate, and peak RSS (VmHWM) (`benchmarks/coldstart_paths.py`):
   (a) the memory-only INIT (WEIGHTS_IN_MEMORY=true: imports, fetch into memory, load, warm-up),
   (b) today's /tmp path (WEIGHTS_IN_MEMORY=false), (c) the common path (boto3 `download_file` +
   `from_pretrained`), (d) Run:ai Model Streamer (`SafetensorsStreamer` over the same objects, in
   `.venv-runai`), and the entry's imports alone (the RSS baseline of the memory target);
2. under the Lambda emulator, to the first token: an on-demand cold start vs an environment restored from
   a SnapStart snapshot (emulated by a fork: `tests/support/snapstart.py`), with the emulator's Init
   Duration (`benchmarks/coldstart_snapstart.py`);
3. TORCH_COMPILE=true vs false under the SnapStart emulation: INIT time and the restored decode speed.

Then every figure against its target (`benchmarks/coldstart_report.py`): memory-only ready <= 1.0 x Run:ai
and <= 0.7 x the common path; its peak RSS <= RSS after the imports + 1.1 x the weights' bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUCKET = "models"
PREFIX = "bench/smollm2-135m/"
PATH_TIMEOUT_S = 900
PATH_NAMES = ("imports", "memory", "tmp", "common", "runai", "on_demand", "snap_eager", "snap_compiled")


def raw_get_mb_per_s(client: Any, part_size: int = 8 * 1024 * 1024, workers: int = 16) -> float:
    """Every object under the prefix as parallel ranged GETs, bytes discarded: the server's ceiling."""
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


def fetch_alone_mb_per_s(client: Any, root: Path, into: str) -> float:
    """One fetcher alone (SHA-256 checked against the manifest): into a fresh /tmp, or into memory."""
    from function.weights.fetcher import ModelFetcher
    from function.weights.memory import MemoryFetcher

    directory = Path(tempfile.mkdtemp(prefix=f"fetch-{into}-", dir=root))
    try:
        fetcher = MemoryFetcher(directory, client) if into == "memory" else ModelFetcher(directory, client)
        result = fetcher.fetch(f"s3://{BUCKET}/{PREFIX}")
        if isinstance(fetcher, MemoryFetcher):
            for weight_file in fetcher.weights.files.values():
                weight_file.buffer.close()
        return float(result.megabytes_per_second)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def child_environment(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment without AWS or model settings, plus `extra`."""
    keep = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MODEL_", "WEIGHTS_", "TORCH_"))}
    return {**keep, "PYTHONPATH": str(REPO), "LOG_LEVEL": "WARNING", **extra}


def run_path(python: str, args: list[str], environment: dict[str, str], log: Path) -> dict[str, Any]:
    """`python -m benchmarks.coldstart_paths ARGS` in a fresh process: its JSON line, or the error."""
    result = subprocess.run(
        [python, "-m", "benchmarks.coldstart_paths", *args],
        cwd=REPO,
        env=child_environment(environment),
        capture_output=True,
        text=True,
        timeout=PATH_TIMEOUT_S,
    )
    log.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr, encoding="utf-8")
    for line in reversed(result.stdout.splitlines()):
        if line.startswith("{") and '"peak_rss_mb"' in line:
            parsed: dict[str, Any] = json.loads(line)
            return parsed
    return {"error": f"exit {result.returncode}; see {log}: {result.stderr.strip()[-300:]}"}


class Round:
    """One round's paths, each a callable that returns its figures (fresh directories under `root`)."""

    def __init__(self, args: argparse.Namespace, seaweed: Any, root: Path, dtype: str) -> None:
        self.args = args
        self.s3 = seaweed.environment()
        self.endpoint = seaweed.endpoint
        self.root = root
        self.dtype = dtype
        self.uri = f"s3://{BUCKET}/{PREFIX}"
        root.mkdir(parents=True, exist_ok=True)

    def lambda_environment(self) -> dict[str, str]:
        return {
            **self.s3,
            "MODEL_PATH": self.uri,
            "CPU_DTYPE": self.dtype,
            "RESPONSE_CACHE_SIZE": "0",
            "AWS_LAMBDA_FUNCTION_NAME": "llm-function",
            "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3008",
        }

    def paths(self) -> dict[str, Callable[[], dict[str, Any]]]:
        chosen: dict[str, Callable[[], dict[str, Any]]] = {
            "imports": self.imports,
            "memory": lambda: self.ours("memory", "true", "snap-start"),
            "tmp": lambda: self.ours("tmp", "false", "on-demand"),
            "common": self.common,
            "runai": self.runai,
            "on_demand": self.on_demand,
            "snap_eager": lambda: self.snapstart(compiled=False),
        }
        if self.args.compile:
            chosen["snap_compiled"] = lambda: self.snapstart(compiled=True)
        return {name: path for name, path in chosen.items() if name in self.args.paths}

    def imports(self) -> dict[str, Any]:
        environment = {k: v for k, v in self.lambda_environment().items() if k != "MODEL_PATH"}
        return run_path(
            sys.executable, ["imports", str(self.args.model)], environment, self.root / "imports.log"
        )

    def ours(self, name: str, in_memory: str, initialization: str) -> dict[str, Any]:
        cache = self.root / f"{name}-cache"
        environment = {
            **self.lambda_environment(),
            "WEIGHTS_IN_MEMORY": in_memory,
            "AWS_LAMBDA_INITIALIZATION_TYPE": initialization,
            "MODEL_CACHE_DIR": str(cache),
        }
        try:
            return run_path(sys.executable, ["ours"], environment, self.root / f"{name}.log")
        finally:
            shutil.rmtree(cache, ignore_errors=True)

    def common(self) -> dict[str, Any]:
        out = self.root / "common-download"
        try:
            return run_path(
                sys.executable,
                ["common", BUCKET, PREFIX, str(out), self.dtype],
                self.s3,
                self.root / "common.log",
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)

    def runai(self) -> dict[str, Any]:
        python = Path(self.args.runai_venv) / "bin" / "python"
        if not python.exists():
            return {"error": f"{python} is missing: run `make runai-venv`"}
        out = self.root / "runai-files"
        environment = {
            **self.s3,
            "AWS_ENDPOINT_URL": self.endpoint,  # what the streamer's S3 client reads
            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",  # path-style, as a local S3 server needs
        }
        try:
            return run_path(
                str(python), ["runai", self.uri, str(out), self.dtype], environment, self.root / "runai.log"
            )
        finally:
            shutil.rmtree(out, ignore_errors=True)
            Path(str(out) + ".lock").unlink(missing_ok=True)

    def on_demand(self) -> dict[str, Any]:
        from benchmarks.coldstart_snapstart import on_demand

        environment = {**self.lambda_environment(), "AWS_LAMBDA_INITIALIZATION_TYPE": "on-demand"}
        try:
            return on_demand(environment, self.root / "on-demand")
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        finally:
            shutil.rmtree(self.root / "on-demand" / "tmp", ignore_errors=True)

    def snapstart(self, *, compiled: bool) -> dict[str, Any]:
        from benchmarks.coldstart_snapstart import snapstart

        root = self.root / ("snap-compiled" if compiled else "snap-eager")
        try:
            return snapstart(self.lambda_environment(), root, compiled=compiled)
        finally:
            shutil.rmtree(root / "inductor", ignore_errors=True)


def ensure_model(model: Path) -> Path:
    if not (model / "config.json").exists():
        print(f"building the example model into {model} ...", flush=True)
        subprocess.run([sys.executable, "-m", "function", "example-model", str(model)], cwd=REPO, check=True)
    return model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.coldstart",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--rounds", type=int, default=5, help="interleaved rounds; medians over them (default 5)"
    )
    parser.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the TORCH_COMPILE SnapStart run (minutes)",
    )
    parser.add_argument("--model", type=Path, default=REPO / ".example-model", help="the model directory")
    parser.add_argument(
        "--runai-venv",
        default=os.environ.get("RUNAI_VENV", str(REPO / ".venv-runai")),
        help="the virtual environment with runai-model-streamer (make runai-venv)",
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        choices=PATH_NAMES,
        default=list(PATH_NAMES),
        help="the paths to run (default: all; snap_compiled unless --no-compile)",
    )
    parser.add_argument("--json", type=Path, help="write every round's raw figures here")
    parser.add_argument("--keep", action="store_true", help="keep the work directory (logs) afterwards")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from benchmarks.coldstart_report import Results, report
    from function.weights.loading import cpu_has_native_bf16
    from tests.support.local_aws import SeaweedFS
    from tests.support.s3 import upload_model

    model = ensure_model(args.model.resolve())
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    dtype = "bfloat16" if cpu_has_native_bf16() else "float32"  # what CPU_DTYPE=auto picks for this model
    work = Path(tempfile.mkdtemp(prefix="llm-function-coldstart-"))
    seaweed = SeaweedFS(work / "seaweedfs").start()
    try:
        client = seaweed.client()
        client.create_bucket(Bucket=BUCKET)
        upload_model(client, BUCKET, PREFIX, model)
        results = Results(
            model_bytes=weights,
            dtype=dtype,
            raw_mb_per_s=max(raw_get_mb_per_s(client) for _ in range(3)),
            fetch_alone={
                into: max(fetch_alone_mb_per_s(client, work, into) for _ in range(3))
                for into in ("tmp", "memory")
            },
        )
        for index in range(args.rounds):
            results.load_average.append(os.getloadavg()[0])
            paths = Round(args, seaweed, work / f"round-{index}", dtype).paths()
            names = list(paths)
            order = names[index % len(names) :] + names[: index % len(names)]
            for name in order:
                started = time.perf_counter()
                row = paths[name]()
                results.add(name, row)
                status = f"failed: {row['error']}" if row.get("error") else "done"
                print(
                    f"round {index + 1}/{args.rounds}: {name} {status} ({time.perf_counter() - started:.0f} s)",
                    flush=True,
                )
            results.rounds += 1
        if args.json:
            args.json.write_text(json.dumps(asdict(results), indent=1), encoding="utf-8")
    finally:
        seaweed.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"work directory kept: {work}")
    report(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
