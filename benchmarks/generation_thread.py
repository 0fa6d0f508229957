"""Why generation runs on one long-lived thread and nothing else starts a parallel region
(function/engine/torch_thread.py): a decode step as the engine runs it (the main thread never
computes), beside the same step while the main thread holds an OpenMP team of its own, as it did
when it loaded the model. Prints; asserts nothing.

Each measurement in a fresh process (the teams last as long as their threads), the two kinds
interleaved, medians. Run: `python -m benchmarks.generation_thread` (the example model).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

from benchmarks.throughput import machine
from function.example_model import build_example_model


def steps_ms(decoder: Any, steps: int) -> float:
    """Milliseconds per decode step of one row, after a 32-token prompt."""
    with torch.inference_mode():
        cache = decoder.new_cache(1, 32 + steps + 4)
        decoder.forward(torch.randint(0, 1000, (1, 32)), torch.arange(32)[None], cache, 0)
        token = torch.tensor([[5]])
        started = time.perf_counter()
        for step in range(steps):
            decoder.forward(token, torch.tensor([[32 + step]]), cache, 32 + step)
        return (time.perf_counter() - started) * 1000 / steps


def measure(model_dir: str, main_team: bool, steps: int) -> None:
    """In the child: load as the engine does, then time decode steps on the generation thread."""
    from function.config import Settings
    from function.engine.engine import Engine
    from function.engine.torch_thread import on_generation_thread

    engine = Engine(Settings(_env_file=None, model_path=model_dir, warm_up="false"))  # type: ignore[call-arg]
    engine.load_startup_model()
    assert engine.current is not None and engine.current.decoder is not None
    if main_team:  # a parallel region on the main thread: its OpenMP team lives on
        torch.ones(2048, 2048) @ torch.ones(2048, 2048)
    print(json.dumps(on_generation_thread(steps_ms, engine.current.decoder, steps)))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measure(args.child[0], args.child[1] == "team", args.steps)
        return
    model_dir = str(build_example_model())
    kinds = {"generation thread alone": "alone", "main thread holds a team": "team"}
    rates: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(args.runs):
        for name, kind in kinds.items():
            command = [sys.executable, "-m", "benchmarks.generation_thread", "--steps", str(args.steps)]
            output = subprocess.run(
                [*command, "--child", model_dir, kind], capture_output=True, text=True, check=True
            ).stdout
            rates[name].append(float(output.strip().splitlines()[-1]))
    print(f"# {machine()}; example model, {args.steps} decode steps, {args.runs} interleaved rounds")
    for name, values in rates.items():
        print(f"{name:<26} {statistics.median(values):6.2f} ms a step (runs {[round(v, 2) for v in values]})")
    ratio = statistics.median(rates["main thread holds a team"]) / statistics.median(
        rates["generation thread alone"]
    )
    print(f"main thread holds a team / generation thread alone: {ratio:.2f}x the time")


if __name__ == "__main__":
    main()
