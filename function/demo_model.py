"""Build a small Llama-architecture model offline, for the quick start and the tests.

The weights are random (seeded, so every build is identical): the text it generates is
noise. What is real is everything around it: a trained byte-level BPE tokenizer, a
transformers config, safetensors weights, and the same loading code a fine-tuned model uses.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from function.config import enforce_hub_offline

enforce_hub_offline()  # the demo model is built offline, like every load

# A minimal chat template in the Llama-2 style, written only when asked for, so the tests can
# cover both the tokenizer's chat template and the instruction-format fallback.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<<SYS>>{{ message['content'] }}<</SYS>>\n"
    "{% elif message['role'] == 'user' %}[INST] {{ message['content'] }} [/INST]"
    "{% else %} {{ message['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


@dataclass(frozen=True)
class DemoModelSize:
    """Shape of the generated model; the defaults give a ~0.5M-parameter model."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 192
    vocab_size: int = 2048
    context_length: int = 2048


# Named sizes: `tiny` for tests and the quick start, the others for benchmarks.
SIZES: dict[str, DemoModelSize] = {
    "tiny": DemoModelSize(),
    "100m": DemoModelSize(
        hidden_size=768, num_layers=12, num_heads=12, intermediate_size=2048, vocab_size=8192
    ),
    "300m": DemoModelSize(
        hidden_size=1024, num_layers=20, num_heads=16, intermediate_size=2816, vocab_size=8192
    ),
}


def demo_corpus() -> str:
    """The Korean and English text the demo tokenizer is trained on (shipped in the package)."""
    return resources.files("function").joinpath("corpus/demo_corpus.txt").read_text(encoding="utf-8")


def _train_tokenizer(vocab_size: int) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    lines = demo_corpus().splitlines()
    # Repeat the corpus so merges reach the requested vocabulary on such a small text.
    tokenizer.train_from_iterator(lines * 4, trainer=trainer)
    return tokenizer


def build_demo_model(
    out_dir: str | Path,
    *,
    size: str | DemoModelSize = "tiny",
    chat_template: bool = False,
    seed: int = 0,
) -> Path:
    """Write a random-weight Llama model and its trained tokenizer to `out_dir`.

    Offline and deterministic: the same arguments give the same files.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    shape = SIZES[size] if isinstance(size, str) else size
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    raw_tokenizer = _train_tokenizer(shape.vocab_size)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=raw_tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=shape.context_length,
    )
    if chat_template:
        tokenizer.chat_template = DEMO_CHAT_TEMPLATE

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_heads,
        max_position_embeddings=shape.context_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "DEMO_MODEL.json").write_text(
        json.dumps(
            {
                "note": "Random weights: generated text is noise. Built by `python -m function demo-model`.",
                "seed": seed,
                "parameters": sum(p.numel() for p in model.parameters()),
                "chat_template": chat_template,
            },
            indent=2,
        )
        + "\n",
        encoding="utf-8",
    )
    return out
