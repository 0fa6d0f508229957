"""LoRA adapters built with peft in the tests, and peft's own answers to compare the server with."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from function.engine.types import Quantization


def build_lora_adapter(base_dir: Path, out_dir: Path, *, seed: int = 0, base_name: str | None = None) -> Path:
    """A LoRA adapter over `base_dir`, saved as peft saves it. `init_lora_weights=False` gives it random
    (non-zero) weights, so it changes the text; `base_name` overrides the base it names."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    config = LoraConfig(
        r=8,
        lora_alpha=32,
        target_modules=["q_proj", "v_proj", "up_proj"],
        init_lora_weights=False,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, config)
        model.save_pretrained(out_dir)
    if base_name is not None:
        import json

        path = out_dir / "adapter_config.json"
        document = json.loads(path.read_text(encoding="utf-8"))
        document["base_model_name_or_path"] = base_name
        path.write_text(json.dumps(document), encoding="utf-8")
    return out_dir


def peft_greedy_text(
    base_dir: Path,
    adapters: dict[str, Path],
    prompt: str,
    max_new_tokens: int,
    *,
    adapter: str | None = None,
    merge: bool = False,
    quantization: Quantization = "none",
) -> str:
    """peft's own greedy answer in process: the base with `adapters` attached, the one named `adapter`
    active (None: the base, through peft's "__base__"). `quantization`: the base quantized on CPU as the
    engine does it (torchao)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    kwargs: dict[str, Any] = {"dtype": torch.float32}
    if quantization != "none":
        from function.weights.cpu_quantization import torchao_config

        kwargs.update(quantization_config=torchao_config(quantization), device_map={"": "cpu"})
    base = AutoModelForCausalLM.from_pretrained(base_dir, **kwargs)
    if quantization != "none":
        from function.weights.cpu_quantization import quantize_embeddings

        quantize_embeddings(base, quantization)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        (first, first_dir), *rest = adapters.items()
        model: Any = PeftModel.from_pretrained(base, str(first_dir), adapter_name=first)
        for name, directory in rest:
            model.load_adapter(str(directory), adapter_name=name)
        extra: dict[str, Any] = {}
        if merge:
            model = model.merge_and_unload()
        else:
            extra["adapter_names"] = [adapter or "__base__"]
        encoded = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            output = model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                repetition_penalty=1.0,
                pad_token_id=tokenizer.pad_token_id,
                **extra,
            )
    prompt_ids = encoded["input_ids"][0].tolist()
    new_ids = output[0].tolist()[len(prompt_ids) :]
    eos = tokenizer.eos_token_id
    if eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
    prefix = tokenizer.decode(prompt_ids, skip_special_tokens=True)
    return str(tokenizer.decode(prompt_ids + new_ids, skip_special_tokens=True)[len(prefix) :])
