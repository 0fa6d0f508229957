"""Throughput figures side by side in one run, each against its target (issue 7). Prints; asserts nothing.

For each model (the ~100M benchmark model and the demo model):
- decode tokens/s of the engine vs plain transformers `generate` on the same weights (target >= 1.0x);
- HTTP overhead: p50/p95 latency through a real uvicorn server minus in-process (target <= 10 ms p50);
- 8 concurrent clients sending the guide's default request: micro-batching vs one at a time (target >= 4x);
- the response cache: hit latency in-process and over HTTP, beside a miss;
- model memory: fp32, 16-bit, 8-bit and 4-bit (target: 4-bit <= 0.35x 16-bit);
- greedy batch agreement: how many batched greedy answers equal the unbatched ones in the serving dtype
  (why BATCH_REDUCED_PRECISION is off by default);
- optionally (--compile) torch.compile: compile seconds and decode speed-up.

Run: `make bench` (all of it) or `python -m benchmarks.throughput --models demo --quick`.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests
import torch

from function.config import Settings
from function.demo_model import build_demo_model
from function.engine.engine import Engine
from function.engine.types import SamplingParams
from function.weights.loading import load_model

REPO = Path(__file__).resolve().parents[1]
PROMPTS = [
    "Python이란 무엇인가요?",
    "머신러닝에 대해 설명해주세요.",
    "The quick brown fox jumps over the lazy dog and",
    "오늘 날씨가 좋네요. 산책을 가볼까요?",
    "Write a haiku about the sea",
    "딥러닝과 머신러닝의 차이점은?",
    "Once upon a time",
    "How do I read a file in Python?",
]
# The guide's default request: sampled, temperature 0.7, top_p 0.9, top_k 50, repetition penalty 1.1.
GUIDE_DEFAULTS: dict[str, Any] = {
    "temperature": 0.7,
    "top_p": 0.9,
    "top_k": 50,
    "repetition_penalty": 1.1,
    "do_sample": True,
}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    described = (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    if torch.cuda.is_available():
        described += f", GPU {torch.cuda.get_device_name(0)}"
    return described


def settings_for(model_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "model_path": str(model_dir),
        "response_cache_size": 0,
        "rate_limit": None,
        "batch_max_size": 1,
        "max_new_tokens": 1024,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def decode_speed(engine: Engine, new_tokens: int, repeats: int) -> tuple[float, float]:
    """Tokens/s of engine.generate and of plain transformers on the same weights, interleaved.

    Plain is what a hand-written transformers server does per request: tokenize, `generate`, decode.
    """
    loaded = engine.current
    assert loaded is not None
    prompt = PROMPTS[0] * 2
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0)
    tokenizer, pad = loaded.tokenizer, loaded.tokenizer.pad_token_id

    def plain() -> float:
        started = time.perf_counter()
        inputs = tokenizer(prompt, return_tensors="pt").to(loaded.device)
        with torch.inference_mode():
            output = loaded.model.generate(
                **inputs, max_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
            )
        new = output[0, inputs["input_ids"].shape[1] :]
        tokenizer.decode(new, skip_special_tokens=True)
        return len(new) / (time.perf_counter() - started)

    def ours() -> float:
        started = time.perf_counter()
        result = engine.generate(prompt, params)
        return result.completion_tokens / (time.perf_counter() - started)

    plain(), ours()  # warm-up
    engine_rates, plain_rates = [], []
    for round_ in range(repeats):  # ABBA order: neither side always runs first
        if round_ % 2:
            engine_rates.append(ours())
            plain_rates.append(plain())
        else:
            plain_rates.append(plain())
            engine_rates.append(ours())
    return statistics.median(engine_rates), statistics.median(plain_rates)


def wait_for_health(process: subprocess.Popen[bytes], url: str, timeout: float, name: str) -> None:
    """Until `url`/health answers 200; an exit or the timeout first is an error naming `name`."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start (exit {process.returncode})")
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server(model_dir: Path, **environment: str) -> Iterator[str]:
    """`python -m function serve` on the model, in a process of its own."""
    port = free_port()
    env = {**os.environ, "RATE_LIMIT": "", **environment}
    env.pop("MODEL_PATH", None)
    command = [sys.executable, "-m", "function", "serve", "--model_path", str(model_dir), "--port", str(port)]
    process = subprocess.Popen(
        [*command, "--host", "127.0.0.1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(process, url, 300, "the server")
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)


def latencies(call: Callable[[int], Any], count: int) -> list[float]:
    call(0)  # warm-up
    seconds = []
    for index in range(count):
        started = time.perf_counter()
        call(index)
        seconds.append(time.perf_counter() - started)
    return seconds


def http_overhead(engine: Engine, url: str, count: int) -> dict[str, float]:
    """Sequential /generate (greedy, 8 new tokens, distinct prompts so the cache never answers) vs in-process.

    Two figures: HTTP latency minus in-process latency (two processes on shared cores: noisy), and
    paired, each HTTP request's latency minus the generation time the server reports for it (an
    upper bound on the HTTP overhead: it also holds tokenizing, decoding and validation).
    """
    params = SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    session = requests.Session()
    unique = itertools.count()  # the server's cache is on: no prompt may repeat
    server_seconds: list[float] = []

    def over_http(index: int) -> None:
        body: dict[str, Any] = {
            "prompt": f"{PROMPTS[index % 8]} {next(unique)}",
            "max_new_tokens": 8,
            "temperature": 0,
        }
        response = session.post(f"{url}/generate", json={**body, "repetition_penalty": 1.0}, timeout=120)
        response.raise_for_status()
        server_seconds.append(float(response.json()["generation_time"]))

    def in_process(index: int) -> None:
        engine.generate(f"{PROMPTS[index % 8]} {next(unique)}", params)

    # Interleaved rounds so drift (thermal, other load) hits both alike.
    http, local, paired = [], [], []
    for _ in range(3):
        server_seconds.clear()
        timed = latencies(over_http, count // 3)
        http += timed
        paired += [total - generating for total, generating in zip(timed, server_seconds[1:], strict=True)]
        local += latencies(in_process, count // 3)
    return {
        "http_p50_ms": percentile(http, 0.5) * 1000,
        "http_p95_ms": percentile(http, 0.95) * 1000,
        "in_process_p50_ms": percentile(local, 0.5) * 1000,
        "in_process_p95_ms": percentile(local, 0.95) * 1000,
        "paired_p50_ms": percentile(paired, 0.5) * 1000,
        "paired_p95_ms": percentile(paired, 0.95) * 1000,
    }


def cache_latency(engine: Engine, url: str) -> dict[str, float]:
    """A miss and then hits, in-process (an engine with the cache on) and over HTTP."""
    params = SamplingParams(max_new_tokens=16, temperature=0)
    started = time.perf_counter()
    engine.generate("cache me", params)
    miss = time.perf_counter() - started
    hits = latencies(lambda _: engine.generate("cache me", params), 50)
    session = requests.Session()
    body: dict[str, Any] = {"prompt": "cache me over http", "max_new_tokens": 16, "temperature": 0}
    http_hits = latencies(lambda _: session.post(f"{url}/generate", json=body, timeout=120), 30)
    assert engine.cache.hits >= 50
    return {
        "miss_ms": miss * 1000,
        "hit_us": percentile(hits, 0.5) * 1e6,
        "http_hit_p50_ms": percentile(http_hits, 0.5) * 1000,
    }


def concurrent_throughput(url: str, clients: int, per_client: int, new_tokens: int) -> float:
    """Completion tokens/s with `clients` each sending `per_client` guide-default requests one after another."""

    def client(number: int) -> int:
        session = requests.Session()
        produced = 0
        for index in range(per_client):
            body: dict[str, Any] = {
                "prompt": f"{PROMPTS[number % 8]} ({number}.{index})",
                "max_new_tokens": new_tokens,
            }
            response = session.post(f"{url}/generate", json={**body, **GUIDE_DEFAULTS}, timeout=600)
            response.raise_for_status()
            produced += int(response.json()["usage"]["completion_tokens"])
        return produced

    client(0)  # warm-up
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        total = sum(pool.map(client, range(clients)))
    return total / (time.perf_counter() - started)


def greedy_agreement(engine: Engine, new_tokens: int) -> tuple[int, int]:
    """Of the 8 prompts, how many batched greedy answers equal the unbatched ones (serving dtype)."""
    from function.engine.generation import run_batch, run_generation

    loaded = engine.current
    assert loaded is not None
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.1)
    encoded = [loaded.tokenizer(prompt, return_tensors="pt") for prompt in PROMPTS]
    alone = [run_generation(loaded, item, params) for item in encoded]
    together = run_batch(loaded, [(item, params) for item in encoded])
    return sum(a == b for a, b in zip(alone, together, strict=True)), len(PROMPTS)


def memory(model_dir: Path, device: str) -> dict[str, float]:
    """Model footprint (MB) per precision: fp32, 16-bit, and bitsandbytes 8-bit and 4-bit."""
    figures: dict[str, float] = {}
    variants: list[tuple[str, Any, dict[str, Any]]] = [
        ("fp32", "none", {"cpu_dtype": "float32"}),
        ("16-bit", "none", {"cpu_dtype": "bfloat16"}),
        ("8-bit", "8bit", {}),
        ("4-bit", "4bit", {}),
    ]
    for name, quantization, overrides in variants:
        if name == "fp32" and device == "cuda":
            continue  # the loader picks bf16/fp16 on CUDA; fp32 is 2x the 16-bit figure
        try:
            loaded = load_model(str(model_dir), quantization, settings_for(model_dir, **overrides), device)
        except Exception as exc:  # a precision this machine can't load: say so, keep going
            print(f"  memory: {name} failed to load: {exc}")
            continue
        figures[name] = loaded.memory_bytes() / 1e6
        if device == "cuda":
            figures[f"{name}_cuda_allocated"] = torch.cuda.memory_allocated() / 1e6
        del loaded
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return figures


def compile_speedup(model_dir: Path, new_tokens: int, repeats: int) -> dict[str, float]:
    """TORCH_COMPILE=true vs eager: the first request (which compiles, from a cold cache) and then decode
    tokens/s, the two engines interleaved."""
    engines = {}
    results: dict[str, float] = {}
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, repetition_penalty=1.0)
    for key, compiled in (("eager", False), ("compiled", True)):
        engines[key] = Engine(settings_for(model_dir, torch_compile=compiled))
        engines[key].load_startup_model()
        started = time.perf_counter()
        engines[key].generate(PROMPTS[0], params)
        results[f"{key}_first_s"] = time.perf_counter() - started
    rates: dict[str, list[float]] = {"eager": [], "compiled": []}
    for round_ in range(repeats):
        for key in ("eager", "compiled") if round_ % 2 == 0 else ("compiled", "eager"):
            started = time.perf_counter()
            result = engines[key].generate(PROMPTS[0], params)
            rates[key].append(result.completion_tokens / (time.perf_counter() - started))
    for key, values in rates.items():
        results[f"{key}_tokens_per_s"] = statistics.median(values)
    return results


def verdict(met: bool) -> str:
    return "met" if met else "MISSED"


Row = tuple[str, str, str, str]


def decode_rows(engine: Engine, args: argparse.Namespace, out: dict[str, Any]) -> list[Row]:
    ours, plain = decode_speed(engine, args.new_tokens, args.repeats)
    ratio = ours / plain
    out["decode"] = {"engine_tokens_per_s": ours, "plain_tokens_per_s": plain, "ratio": ratio}
    shown = f"{ours:.1f} vs {plain:.1f}"
    return [
        ("decode tok/s: engine vs plain generate", shown, f"{ratio:.2f}x", f">= 1.0x {verdict(ratio >= 1)}")
    ]


def server_rows(engine: Engine, model_dir: Path, args: argparse.Namespace, out: dict[str, Any]) -> list[Row]:
    with server(model_dir, BATCH_MAX_SIZE="1", RESPONSE_CACHE_SIZE="256") as url:
        overhead = http_overhead(engine, url, args.http_requests)
        cached_engine = Engine(settings_for(model_dir, response_cache_size=256))
        cached_engine.load_startup_model()
        cache = cache_latency(cached_engine, url)
        del cached_engine
        one_at_a_time = concurrent_throughput(url, args.clients, args.per_client, args.new_tokens)
    with server(model_dir, BATCH_MAX_SIZE=str(args.clients), RESPONSE_CACHE_SIZE="0") as url:
        batched = concurrent_throughput(url, args.clients, args.per_client, args.new_tokens)
    p50 = overhead["http_p50_ms"] - overhead["in_process_p50_ms"]
    p95 = overhead["http_p95_ms"] - overhead["in_process_p95_ms"]
    out["http"] = {**overhead, "overhead_p50_ms": p50, "overhead_p95_ms": p95}
    speedup = batched / one_at_a_time
    out["clients"] = {
        "batched_tokens_per_s": batched,
        "one_at_a_time_tokens_per_s": one_at_a_time,
        "ratio": speedup,
    }
    out["cache"] = cache
    return [
        (
            "HTTP overhead p50 / p95 (uvicorn - in-process)",
            f"{p50:.1f} / {p95:.1f} ms",
            f"of {overhead['in_process_p50_ms']:.0f} ms",
            "(noisy: two processes)",
        ),
        (
            "HTTP overhead p50 / p95, paired per request",
            f"{overhead['paired_p50_ms']:.1f} / {overhead['paired_p95_ms']:.1f} ms",
            "latency - server's gen. time",
            f"p50 <= 10 ms {verdict(overhead['paired_p50_ms'] <= 10)}",
        ),
        (
            f"{args.clients} clients: micro-batching vs one at a time",
            f"{batched:.0f} vs {one_at_a_time:.0f} tok/s",
            f"{speedup:.2f}x",
            f">= 4x {verdict(speedup >= 4)}",
        ),
        (
            "cache hit: in-process / HTTP p50",
            f"{cache['hit_us']:.0f} us / {cache['http_hit_p50_ms']:.1f} ms",
            f"miss {cache['miss_ms']:.0f} ms",
            "(no target)",
        ),
    ]


def agreement_rows(engine: Engine, args: argparse.Namespace, out: dict[str, Any]) -> list[Row]:
    same, total = greedy_agreement(engine, args.new_tokens)
    out["greedy_agreement"] = {"same": same, "of": total}
    dtype = engine.current.dtype if engine.current else "?"
    return [("greedy batched = unbatched", f"{same} of {total}", dtype, "(why exact-only batching)")]


def memory_rows(model_dir: Path, device: str, parameters: int, out: dict[str, Any]) -> list[Row]:
    footprint = memory(model_dir, device)
    out["memory_mb"] = footprint
    if "16-bit" not in footprint or "4-bit" not in footprint:
        return [("memory MB", json.dumps(footprint), "", "4-bit or 16-bit failed to load")]
    ratio = footprint["4-bit"] / footprint["16-bit"]
    shown = " / ".join(f"{footprint[k]:.1f}" for k in ("fp32", "16-bit", "8-bit", "4-bit") if k in footprint)
    # Quantization leaves embeddings, norms and the output layer alone: on the 0.3M demo model they are
    # nearly all of it, so the target is judged on models of 50M parameters and up.
    target = f"<= 0.35x {verdict(ratio <= 0.35)}" if parameters >= 50e6 else "(judged >= 50M)"
    return [("memory MB: fp32 / 16-bit / 8-bit / 4-bit", shown, f"4-bit {ratio:.2f}x", target)]


def compile_rows(model_dir: Path, args: argparse.Namespace, out: dict[str, Any]) -> list[Row]:
    compiled = compile_speedup(model_dir, args.new_tokens, args.repeats)
    out["compile"] = compiled
    gain = compiled["compiled_tokens_per_s"] / compiled["eager_tokens_per_s"]
    first = f"{compiled['compiled_first_s']:.1f} s vs {compiled['eager_first_s']:.2f} s"
    return [
        ("torch.compile: decode speed-up; first request", f"{gain:.2f}x", first, "(opt-in: TORCH_COMPILE)")
    ]


def bench_model(name: str, size: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    model_dir = build_demo_model(workdir / name, size=size)
    engine = Engine(settings_for(model_dir))
    engine.load_startup_model()
    loaded = engine.current
    assert loaded is not None, engine.status().reason
    print(
        f"\n## {name}: {loaded.parameter_count / 1e6:.1f}M parameters, {loaded.device}, {loaded.dtype}",
        flush=True,
    )
    out: dict[str, Any] = {
        "parameters": loaded.parameter_count,
        "device": loaded.device,
        "dtype": loaded.dtype,
    }
    sections: list[tuple[str, Callable[[], list[Row]]]] = [
        ("decode", lambda: decode_rows(engine, args, out)),
        ("server", lambda: server_rows(engine, model_dir, args, out)),
        ("agreement", lambda: agreement_rows(engine, args, out)),
        ("memory", lambda: memory_rows(model_dir, loaded.device, loaded.parameter_count, out)),
    ]
    if args.compile:
        sections.append(("compile", lambda: compile_rows(model_dir, args, out)))
    rows: list[Row] = []
    for section, run in sections:
        if section == "memory":
            engine._current = None  # free the served copy before loading four more
            gc.collect()
        try:
            rows += run()
        except Exception as exc:  # one failed figure must not cost the others
            rows.append((section, "FAILED", type(exc).__name__, str(exc)[:120]))
            out[section] = {"error": repr(exc)}
    width = max(len(row[0]) for row in rows)
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:<24} {row[2]:<22} {row[3]}", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="100m,demo", help="comma-separated: 100m, demo, 300m")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=9, help="interleaved rounds per speed comparison")
    parser.add_argument("--http-requests", type=int, default=30)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--per-client", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="also measure TORCH_COMPILE (slow to compile)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--quick", action="store_true", help="fewer repeats, for a smoke run")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.http_requests, args.per_client, args.new_tokens = 2, 9, 1, 8
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    # A cold compile cache of its own: the first compiled request pays the whole compile, as in production.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="llm-bench-inductor-")
    print(f"# make bench: {machine()}")
    sizes = {"100m": "100m", "300m": "300m", "demo": "tiny"}
    results: dict[str, Any] = {"machine": machine(), "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory(prefix="llm-bench-") as workdir:
        for name in args.models.split(","):
            results[name] = bench_model(name, sizes[name], args, Path(workdir))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
