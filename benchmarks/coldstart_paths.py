"""One cold-start path in a fresh process: `python -m benchmarks.coldstart_paths PATH ...`, one JSON line out.

`benchmarks/coldstart.py` starts one process per path per round. Every path measures from its own first
statement (before any heavy import) to a model ready to generate (weights in the model, tokenizer loaded),
then runs the same warm-up (greedy, 4 new tokens after "Hello"), and reports its peak RSS (VmHWM):

- `ours`: `import function.handler`, the Lambda entry (the environment picks WEIGHTS_IN_MEMORY); its
  phases come from the engine's cold-start telemetry;
- `imports`: the same entry without MODEL_PATH: imports only (time, and the RSS they leave), then the RSS
  a tokenizer adds on top of them;
- `common`: boto3 `download_file` of every object, then `from_pretrained` from that directory;
- `runai`: Run:ai Model Streamer (run in `.venv-runai`): config and tokenizer pulled with its
  `ObjectStorageModel`, the safetensors streamed by `SafetensorsStreamer` from the same S3 objects
  (endpoint from AWS_ENDPOINT_URL; 0.17's default `owned=True` hands each tensor over, no copy), and the
  model built from that state dict as ours is (`from_pretrained(None, state_dict=...)`).

A thread samples VmRSS every 20 ms, so the peak up to "ready" (fetch and load) is told apart from the
peak of the whole INIT (the warm-up's first-call allocations included).

Only the standard library is imported here at module level, so the heavy imports are timed.
"""

from __future__ import annotations

import time

STARTED = time.perf_counter()

import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

WARM_UP_PROMPT = "Hello"
WARM_UP_TOKENS = 4


def status_mb(field: str) -> float:
    """A VmRSS/VmHWM-style line of /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def since_start() -> float:
    return time.perf_counter() - STARTED


class RssSampler:
    """VmRSS every `interval` seconds in a daemon thread: (seconds since start, MiB) pairs."""

    def __init__(self, interval: float = 0.02) -> None:
        self.samples: list[tuple[float, float]] = []
        self.interval = interval
        threading.Thread(target=self._run, name="rss-sampler", daemon=True).start()

    def _run(self) -> None:
        while True:
            self.samples.append((since_start(), status_mb("VmRSS")))
            time.sleep(self.interval)

    def peak_until(self, seconds: float | None) -> float | None:
        if seconds is None:
            return None
        return max((mb for at, mb in self.samples if at <= seconds), default=None)


def warm_up(model: Any, tokenizer: Any) -> float:
    """The engine's warm-up, by hand: one short greedy generation."""
    import torch

    started = time.perf_counter()
    encoded = tokenizer(WARM_UP_PROMPT, return_tensors="pt")
    with torch.inference_mode():
        model.generate(
            **encoded,
            max_new_tokens=WARM_UP_TOKENS,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    return time.perf_counter() - started


def ours() -> dict[str, Any]:
    import function.handler as entry

    initialized = since_start()
    phases = entry.engine.cold_start() or {}
    offset = entry._IMPORTS_STARTED - STARTED
    loaded = entry.engine.current
    measured = entry.engine.telemetry.startup_phases  # set without a model too (the `imports` path)
    return {
        "imports_s": offset + measured["imports_s"],
        "rss_after_imports_mb": measured.get("rss_after_imports_mb"),
        # The prefetch ran during the imports: the engine's fetch_s is the wait for it after them.
        "fetch_s": phases.get("fetch_s"),
        "fetch_mb_per_s": phases.get("fetch_mb_per_s"),
        "fetch_in_memory": phases.get("fetch_in_memory"),
        "load_s": phases.get("load_s"),
        "ready_s": None if phases.get("ready_s") is None else offset + phases["ready_s"],
        "warm_up_s": phases.get("warm_up_s"),
        "init_s": initialized,
        "dtype": None if loaded is None else str(loaded.model.dtype).removeprefix("torch."),
        # The /tmp path fetches in a child process: its peak is apart from this one's.
        "child_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
    }


def imports(model_dir: str) -> dict[str, Any]:
    """The entry's imports alone (no MODEL_PATH), then what a tokenizer adds to the RSS on top of them."""
    figures = ours()
    from transformers import AutoTokenizer

    before = status_mb("VmRSS")
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    figures["tokenizer_rss_mb"] = status_mb("VmRSS") - before
    del tokenizer
    return figures


def common(bucket: str, prefix: str, out: str, dtype_name: str) -> dict[str, Any]:
    import boto3
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    imported = since_start()
    rss_after_imports = status_mb("VmRSS")
    target = Path(out)
    target.mkdir(parents=True, exist_ok=True)
    s3 = boto3.client("s3")
    for item in s3.list_objects_v2(Bucket=bucket, Prefix=prefix)["Contents"]:
        s3.download_file(bucket, item["Key"], str(target / item["Key"][len(prefix) :]))
    downloaded = since_start()
    tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        target, local_files_only=True, dtype=getattr(torch, dtype_name)
    )
    ready = since_start()
    return {
        "imports_s": imported,
        "rss_after_imports_mb": rss_after_imports,
        "fetch_s": downloaded - imported,
        "load_s": ready - downloaded,
        "ready_s": ready,
        "warm_up_s": warm_up(model, tokenizer),
        "init_s": since_start(),
        "dtype": dtype_name,
    }


def runai(uri: str, out: str, dtype_name: str) -> dict[str, Any]:
    import torch
    import transformers
    from runai_model_streamer import ObjectStorageModel, SafetensorsStreamer, list_safetensors
    from transformers import AutoConfig, AutoTokenizer

    imported = since_start()
    rss_after_imports = status_mb("VmRSS")
    with ObjectStorageModel(model_path=uri, dst=out) as storage:  # what vLLM's Run:ai loader does
        storage.pull_files(ignore_pattern=["*.safetensors", "*.bin", "*.pt", "*.pth"])
    pulled = since_start()
    state: dict[str, Any] = {}
    with SafetensorsStreamer() as streamer:
        streamer.stream_files(list_safetensors(uri))
        for name, tensor in streamer.get_tensors():
            state[name] = tensor  # owned (the default): valid after the streamer closes
    streamed = since_start()
    config = AutoConfig.from_pretrained(out, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(out, local_files_only=True)
    model_class = getattr(transformers, config.architectures[0])
    model = model_class.from_pretrained(
        None, config=config, state_dict=state, dtype=getattr(torch, dtype_name)
    )
    del state
    ready = since_start()
    return {
        "imports_s": imported,
        "rss_after_imports_mb": rss_after_imports,
        "fetch_s": streamed - imported,
        "small_files_s": pulled - imported,
        "load_s": ready - streamed,
        "ready_s": ready,
        "warm_up_s": warm_up(model, tokenizer),
        "init_s": since_start(),
        "dtype": dtype_name,
    }


def main(argv: list[str]) -> int:
    paths: dict[str, Callable[..., dict[str, Any]]] = {
        "ours": ours,
        "imports": imports,
        "common": common,
        "runai": runai,
    }
    if not argv or argv[0] not in paths:
        print(f"usage: python -m benchmarks.coldstart_paths {'|'.join(paths)} [ARGS]", file=sys.stderr)
        return 2
    sampler = RssSampler()
    figures = paths[argv[0]](*argv[1:])
    figures["peak_rss_to_ready_mb"] = sampler.peak_until(figures.get("ready_s"))
    figures["peak_rss_mb"] = status_mb("VmHWM")
    print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
