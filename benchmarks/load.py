"""64 clients against one server for a bounded time: what overload looks like. Prints; asserts nothing.

A real `python -m function serve` process (the example model by default, or the demo model) gets
`--clients` concurrent clients, each sending the guide's /generate request in a loop for
`--seconds` seconds, while a prober asks /health every 250 ms. Printed: throughput (requests/s,
tokens/s), latency p50/p99 of the answered requests, the share shed (503 with Retry-After), other
failures, /health p50/p99, and the server's peak resident memory.

Run: `make bench-load` or `python -m benchmarks.load --model demo --seconds 20`.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import requests

REPO = Path(__file__).resolve().parents[1]
REQUEST: dict[str, Any] = {
    "prompt": "Python이란 무엇인가요?",
    "max_new_tokens": 32,
    "temperature": 0.7,
    "top_p": 0.9,
}


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text(encoding="utf-8").splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def model_dir(name: str, workdir: Path) -> Path:
    if name == "example":
        target = REPO / ".example-model"
        subprocess.run([sys.executable, "-m", "function", "example-model", str(target)], check=True)
        return target
    from function.demo_model import build_demo_model

    return build_demo_model(workdir / "demo")


def start_server(model: Path, port: int, extra_env: dict[str, str]) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "API_KEYS", "ADMIN_API_KEYS")}
    env.update({"RATE_LIMIT": "", "LOG_LEVEL": "WARNING", **extra_env})
    command = [sys.executable, "-m", "function", "serve", "--model_path", str(model)]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except requests.ConnectionError:
            time.sleep(0.3)
    process.kill()
    raise SystemExit("the server did not become healthy")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        model = model_dir(args.model, Path(scratch))
        port = free_port()
        server = start_server(model, port, {"MAX_QUEUED_REQUESTS": str(args.queue)} if args.queue else {})
        url = f"http://127.0.0.1:{port}"
        stop_at = time.monotonic() + args.seconds
        latencies: list[float] = []
        statuses: Counter[str] = Counter()
        tokens = 0
        health: list[float] = []
        peak_rss = rss_mb(server.pid)
        lock = threading.Lock()

        def client() -> None:
            nonlocal tokens
            session = requests.Session()
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    response = session.post(f"{url}/generate", json=REQUEST, timeout=120)
                except requests.RequestException as exc:
                    with lock:
                        statuses[type(exc).__name__] += 1
                    continue
                elapsed = time.perf_counter() - started
                with lock:
                    statuses[str(response.status_code)] += 1
                    if response.status_code == 200:
                        latencies.append(elapsed)
                        tokens += response.json()["usage"]["completion_tokens"]
                if response.status_code == 503:
                    time.sleep(float(response.headers.get("Retry-After", "1")))

        def prober() -> None:
            nonlocal peak_rss
            while time.monotonic() < stop_at:
                started = time.perf_counter()
                try:
                    requests.get(f"{url}/health", timeout=30)
                    health.append(time.perf_counter() - started)
                except requests.RequestException:
                    health.append(30.0)
                peak_rss = max(peak_rss, rss_mb(server.pid))
                time.sleep(0.25)

        try:
            with ThreadPoolExecutor(max_workers=args.clients + 1) as pool:
                pool.submit(prober)
                for _ in range(args.clients):
                    pool.submit(client)
        finally:
            server.terminate()
            server.wait(timeout=30)
        answered = statuses["200"]
        total = sum(statuses.values())
        print(
            f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; model {args.model}"
        )
        print(
            f"{args.clients} clients for {args.seconds:.0f} s against one server (MAX_QUEUED_REQUESTS "
            f"{args.queue or 'default'})"
        )
        print("| figure | value |\n|---|---:|")
        print(f"| requests answered / s | {answered / args.seconds:.2f} |")
        print(f"| tokens / s | {tokens / args.seconds:.1f} |")
        print(
            f"| latency p50 / p99 (answered) | {percentile(latencies, 0.5):.2f} / {percentile(latencies, 0.99):.2f} s |"
        )
        print(f"| shed (503) | {statuses['503'] / max(1, total):.1%} of {total} |")
        others = {k: v for k, v in statuses.items() if k not in ("200", "503")}
        print(f"| other outcomes | {others or 'none'} |")
        print(
            f"| /health p50 / p99 | {percentile(health, 0.5) * 1000:.0f} / {percentile(health, 0.99) * 1000:.0f} ms |"
        )
        print(f"| server peak RSS | {peak_rss:.0f} MB |")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", choices=("example", "demo"), default="example")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0, help="bounded run time (default 60)")
    parser.add_argument("--queue", type=int, default=None, help="MAX_QUEUED_REQUESTS for the server")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
