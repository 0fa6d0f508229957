"""CPU decode speed and memory of the 8-bit and 4-bit loads, side by side in one run (issue 14).

On the example model (SmolLM2-135M-Instruct, `make example-model`): float32 and bfloat16;
bitsandbytes 8-bit and 4-bit NF4 (what `--load_in_8bit` / `--load_in_4bit` ran on CPU before);
torchao int8 and int4 as the loader builds them with `CPU_DTYPE=auto` (what the flags run on CPU
now: a float32 model around the quantized layers), and the same with a bfloat16 model around
them. Greedy, batch 1: decode tokens/s from the first new token to the last (the prompt's prefill
is not counted). The variants take turns, round after round; the median round is printed, and
the best one (the least disturbed by other work on the machine). Memory: the bytes of every
parameter and buffer (torchao tensors by their inner tensors), against the bfloat16 model.
Prints; asserts nothing. Run: `make bench-quant`.
"""

from __future__ import annotations

import argparse
import logging
import platform
import statistics
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from function.engine.types import Quantization
from function.weights.footprint import model_bytes

REPO = Path(__file__).resolve().parents[1]
QUESTION = "What is the capital of France?"


def _bitsandbytes(bits: int) -> Any:
    from transformers import BitsAndBytesConfig

    if bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True,
    )


def _torchao(quantization: Quantization) -> Any:
    from function.weights.cpu_quantization import torchao_config

    return torchao_config(quantization)


# name: (model dtype, quantization config, the quantization of quantize_embeddings)
VARIANTS: dict[str, tuple[torch.dtype, Callable[[], Any] | None, Quantization | None]] = {
    "float32": (torch.float32, None, None),
    "bfloat16": (torch.bfloat16, None, None),
    "bitsandbytes 8-bit": (torch.float32, lambda: _bitsandbytes(8), None),
    "bitsandbytes 4-bit": (torch.float32, lambda: _bitsandbytes(4), None),
    "torchao int8": (torch.float32, lambda: _torchao("8bit"), "8bit"),
    "torchao int4": (torch.float32, lambda: _torchao("4bit"), "4bit"),
    "torchao int8, bf16 model": (torch.bfloat16, lambda: _torchao("8bit"), "8bit"),
    "torchao int4, bf16 model": (torch.bfloat16, lambda: _torchao("4bit"), "4bit"),
}


def load(
    model_dir: Path, dtype: torch.dtype, config: Callable[[], Any] | None, quantization: Quantization | None
) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if config is not None:
        kwargs.update(quantization_config=config(), device_map={"": "cpu"})
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()
    if quantization is not None:
        from function.weights.cpu_quantization import quantize_embeddings

        quantize_embeddings(model, quantization)
    return model


def generate(model: Any, inputs: dict[str, Any], new_tokens: int, pad: int) -> tuple[float, Any]:
    """Decode tokens/s of one greedy generation (from the first new token to the last), and its output."""
    from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

    stamps: list[float] = []

    class Stamp(StoppingCriteria):  # type: ignore[misc]
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            stamps.append(time.perf_counter())  # once per new token
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    config = GenerationConfig(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad
    )
    with torch.inference_mode():
        output = model.generate(
            **inputs, generation_config=config, stopping_criteria=StoppingCriteriaList([Stamp()])
        )
    return (len(stamps) - 1) / (stamps[-1] - stamps[0]), output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=REPO / ".example-model")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=list(VARIANTS), help="a subset of the variants")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    logging.disable(logging.WARNING)
    from transformers import AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from function.weights.cpu import cpu_has_native_bf16

    transformers_logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
    messages = [{"role": "user", "content": QUESTION}]
    encoded: Any = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    inputs: dict[str, Any] = dict(encoded)
    prompt_length = inputs["input_ids"].shape[1]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    print(
        f"{platform.processor() or platform.machine()}, native bf16: {cpu_has_native_bf16()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model.name}, "
        f"{args.new_tokens} new tokens, greedy, batch 1, {args.rounds} rounds"
    )
    names = args.only or list(VARIANTS)
    models: dict[str, Any] = {}
    for name in names:
        started = time.perf_counter()
        models[name] = load(args.model, *VARIANTS[name])
        seconds = time.perf_counter() - started
        _, output = generate(models[name], inputs, 16, pad)
        answer = tokenizer.decode(output[0, prompt_length:], skip_special_tokens=True)
        print(f"  loaded {name} in {seconds:.1f} s; answer: {answer!r}", flush=True)
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            rates[name].append(generate(models[name], inputs, args.new_tokens, pad)[0])
    sixteen_bit = model_bytes(models["bfloat16"]) if "bfloat16" in models else None
    print(f"{'variant':<26}{'tok/s median':>13}{'best':>8}{'memory MB':>11}{'x bf16':>8}")
    for name in names:
        memory = model_bytes(models[name])
        ratio = f"{memory / sixteen_bit:.2f}" if sixteen_bit else "-"
        print(
            f"{name:<26}{statistics.median(rates[name]):>13.1f}{max(rates[name]):>8.1f}"
            f"{memory / 1e6:>11.1f}{ratio:>8}"
        )


if __name__ == "__main__":
    main()
