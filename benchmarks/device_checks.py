"""The checks issue 7 asks of a GPU host, on whatever device the engine picks: `make bench-device`.

On a CUDA host they cover the image's CUDA path; on a CPU they run the same code as a dry run.
Prints figures as JSON lines.

- The Lambda entry point on CUDA: a fresh process imports `function.handler` (the image's CMD) with
  MODEL_PATH set and invokes it with events/direct-generate.json and events/direct-model-info.json.
- bitsandbytes on the GPU: a real server process per precision (16-bit, --load_in_8bit, --load_in_4bit)
  answers /generate, and its /model_info reports the GPU memory figures.
- Batch invariance: how many batched greedy answers equal the unbatched ones, fp32 and 16-bit.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import requests

from benchmarks.throughput import PROMPTS, REPO, server

HANDLER_SCRIPT = """
import json
from function import handler

class Context:  # what the Lambda runtime passes
    aws_request_id = "device-check"
    function_name = "llm-function"
    memory_limit_in_mb = 10240
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:llm-function"
    def get_remaining_time_in_millis(self):
        return 60_000

out = {}
for name in ("direct-generate", "direct-model-info"):
    event = json.loads(open(f"events/{name}.json").read())
    if name == "direct-generate":
        event["body"]["prompt"] = "Python이란"
    out[name] = handler.handler(event, Context())
print(json.dumps(out, ensure_ascii=False))
"""


def report(name: str, figures: Any) -> None:
    print(json.dumps({name: figures}, ensure_ascii=False), flush=True)


def lambda_entry_point(model_dir: Path) -> None:
    env = {**os.environ, "MODEL_PATH": str(model_dir), "AWS_LAMBDA_FUNCTION_NAME": "llm-function-gpu-check"}
    done = subprocess.run(
        [sys.executable, "-c", HANDLER_SCRIPT], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    if done.returncode != 0:
        report("lambda_entry_point", {"error": done.stderr[-3000:]})
        return
    responses = json.loads(done.stdout.strip().splitlines()[-1])
    report("lambda_entry_point", responses)


def quantized_servers(model_dir: Path) -> None:
    for flag in ("", "--load_in_8bit", "--load_in_4bit"):
        environment = {"LOAD_IN_8BIT": str(flag == "--load_in_8bit").lower()}
        environment["LOAD_IN_4BIT"] = str(flag == "--load_in_4bit").lower()
        try:
            with server(model_dir, **environment) as url:
                body: dict[str, Any] = {"prompt": PROMPTS[0], "max_new_tokens": 16, "temperature": 0}
                generated = requests.post(f"{url}/generate", json=body, timeout=300)
                info = requests.get(f"{url}/model_info", timeout=60).json()
        except RuntimeError as exc:
            report(f"server {flag or 'default precision'}", {"error": str(exc)})
            continue
        report(
            f"server {flag or 'default precision'}",
            {"generate_status": generated.status_code, "generate": generated.json(), "model_info": info},
        )


def batch_invariance(model_dir: Path, device: str) -> None:
    import torch

    from benchmarks.throughput import settings_for
    from function.engine.generation import run_batch, run_generation
    from function.engine.types import SamplingParams
    from function.weights.loading import load_model

    for dtype in ("float32", "bfloat16"):
        loaded = load_model(str(model_dir), "none", settings_for(model_dir, cpu_dtype=dtype), device)
        loaded.model.to(getattr(torch, dtype))
        params = SamplingParams(max_new_tokens=32, temperature=0, repetition_penalty=1.1)
        encoded = [loaded.tokenizer(prompt, return_tensors="pt") for prompt in PROMPTS]
        alone = [run_generation(loaded, item, params) for item in encoded]
        together = run_batch(loaded, [(item, params) for item in encoded])
        same = sum(a == b for a, b in zip(alone, together, strict=True))
        report(f"greedy batched = unbatched, {device} {dtype}", f"{same} of {len(PROMPTS)}")
        del loaded
        if device == "cuda":
            torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", default="100m", help="demo model size: tiny, 100m, 300m")
    args = parser.parse_args()
    import torch

    from function.demo_model import build_demo_model
    from function.weights.loading import pick_device

    device = pick_device()
    gpu = torch.cuda.get_device_name(0) if device == "cuda" else None
    report("device", {"device": device, "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda})
    with tempfile.TemporaryDirectory(prefix="llm-device-") as workdir:
        model_dir = build_demo_model(Path(workdir) / f"model-{args.size}", size=args.size)
        lambda_entry_point(model_dir)
        quantized_servers(model_dir)
        batch_invariance(model_dir, device)


if __name__ == "__main__":
    main()
