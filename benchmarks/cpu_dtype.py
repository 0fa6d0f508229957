"""Decode speed on CPU, float32 vs bfloat16, side by side, for several model sizes.

Prints figures (not a test). Sets the evidence for `cpu_bf16_min_parameters`: with
CPU_DTYPE=auto the engine picks bf16 only on CPUs with native bf16 and only for models at
least that big. Run: `make bench-dtype`.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from function.demo_model import SIZES, DemoModelSize, build_demo_model
from function.weights.loading import cpu_has_native_bf16

SHAPES = {
    "tiny (0.3M)": SIZES["tiny"],
    "3M": DemoModelSize(hidden_size=192, num_layers=4, num_heads=4, intermediate_size=512),
    "9M": DemoModelSize(hidden_size=320, num_layers=6, num_heads=5, intermediate_size=864),
    "25M": DemoModelSize(hidden_size=512, num_layers=8, num_heads=8, intermediate_size=1536),
    "100M": SIZES["100m"],
}


def decode_tokens_per_second(model_dir: Path, dtype: torch.dtype, new_tokens: int, repeats: int) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=dtype).eval()
    inputs = tokenizer("Python이란 무엇인가요? " * 4, return_tensors="pt")
    config = GenerationConfig(
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    rates = []
    with torch.inference_mode():
        model.generate(**inputs, generation_config=config)  # warm-up
        for _ in range(repeats):
            started = time.perf_counter()
            model.generate(**inputs, generation_config=config)
            rates.append(new_tokens / (time.perf_counter() - started))
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    print(f"native bf16 on this CPU: {cpu_has_native_bf16()}; torch threads: {torch.get_num_threads()}")
    print(f"{'model':<14}{'params':>12}{'fp32 tok/s':>12}{'bf16 tok/s':>12}{'bf16/fp32':>11}")
    with tempfile.TemporaryDirectory() as root:
        for label, shape in SHAPES.items():
            model_dir = build_demo_model(Path(root) / label.split()[0], size=shape)
            from function.weights.checkpoint import count_checkpoint_parameters

            params = count_checkpoint_parameters(model_dir)
            fp32 = decode_tokens_per_second(model_dir, torch.float32, args.new_tokens, args.repeats)
            bf16 = decode_tokens_per_second(model_dir, torch.bfloat16, args.new_tokens, args.repeats)
            print(f"{label:<14}{params:>12,}{fp32:>12.1f}{bf16:>12.1f}{bf16 / fp32:>10.2f}x", flush=True)


if __name__ == "__main__":
    main()
