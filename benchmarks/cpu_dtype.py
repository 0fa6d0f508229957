"""Decode speed on CPU, float32 vs bfloat16, side by side, on the shapes of real models.

Prints figures (not a test): the evidence for `CPU_DTYPE=auto` (function/weights/cpu.py). Each
architecture is built from its published shape (width, depth, heads, vocabulary, tied embeddings)
with random weights, in memory: speed depends on the shapes, not on the values. Greedy, batch 1,
decode tokens/s from the first new token to the last; the two dtypes take turns, and the best of
the rounds is printed (the one least disturbed by other work on the machine) beside the median.
Run: `make bench-dtype` (add `--only smollm2-135m` for one).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from typing import Any

import torch

from function.config import Settings
from function.weights.cpu import cpu_has_native_bf16, thread_count

# name: (hidden, layers, intermediate, heads, kv heads, vocabulary, tied embeddings)
ARCHITECTURES: dict[str, tuple[int, int, int, int, int, int, bool]] = {
    "smollm2-135m": (576, 30, 1536, 9, 3, 49152, True),
    "qwen2.5-0.5b": (896, 24, 4864, 14, 2, 151936, True),
    "smollm2-360m": (960, 32, 2560, 15, 5, 49152, True),
    "llama-3.2-1b": (2048, 16, 8192, 32, 8, 128256, True),
    "smollm2-1.7b": (2048, 24, 8192, 32, 32, 49152, True),
}


def build(shape: tuple[int, int, int, int, int, int, bool], dtype: torch.dtype) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    hidden, layers, intermediate, heads, kv_heads, vocab, tied = shape
    config = LlamaConfig(
        hidden_size=hidden,
        num_hidden_layers=layers,
        intermediate_size=intermediate,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        vocab_size=vocab,
        tie_word_embeddings=tied,
        max_position_embeddings=4096,
    )
    torch.manual_seed(0)
    model: Any = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def decode_rate(model: Any, new_tokens: int) -> float:
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):  # type: ignore[misc]
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            stamps.append(time.perf_counter())
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    prompt = torch.arange(3, 35).unsqueeze(0)  # 32 tokens
    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0
    )
    with torch.inference_mode():
        model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            generation_config=config,
            stopping_criteria=StoppingCriteriaList([Stamp()]),
        )
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=list(ARCHITECTURES))
    args = parser.parse_args()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    transformers_logging.set_verbosity_error()
    torch.set_num_threads(thread_count(Settings(_env_file=None)))  # type: ignore[call-arg]
    print(
        f"native bf16 on this CPU: {cpu_has_native_bf16()}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; greedy, batch 1, {args.new_tokens} new tokens, "
        f"{args.rounds} rounds (best / median tok/s)"
    )
    print(
        f"{'architecture':<15}{'hidden':>7}{'layers':>7}{'params':>8}{'fp32':>16}{'bf16':>16}{'bf16/fp32':>11}"
    )
    for name in args.only or list(ARCHITECTURES):
        shape = ARCHITECTURES[name]
        models = {dtype: build(shape, dtype) for dtype in (torch.float32, torch.bfloat16)}
        parameters = sum(p.numel() for p in models[torch.float32].parameters())
        rates: dict[torch.dtype, list[float]] = {dtype: [] for dtype in models}
        for model in models.values():
            decode_rate(model, 4)  # warm-up
        for _ in range(args.rounds):
            for dtype, model in models.items():
                rates[dtype].append(decode_rate(model, args.new_tokens))
        fp32, bf16 = (rates[torch.float32], rates[torch.bfloat16])
        print(
            f"{name:<15}{shape[0]:>7}{shape[1]:>7}{parameters / 1e6:>7.0f}M"
            f"{max(fp32):>8.1f} /{statistics.median(fp32):>6.1f}{max(bf16):>8.1f} /{statistics.median(bf16):>6.1f}"
            f"{max(bf16) / max(fp32):>10.2f}x",
            flush=True,
        )
        del models
        gc.collect()


if __name__ == "__main__":
    main()
