"""Tiny random Llama-family models for our decoder's tests (function.engine.decoder), and greedy
decoding with ours and with transformers' `generate` on them."""

from __future__ import annotations

import copy
from typing import Any

import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from function.engine.decode_loop import decode
from function.engine.decoder import Decoder
from function.engine.decoder_choice import fuse_model

SHAPE: dict[str, Any] = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention: 2 query heads per key head
    "max_position_embeddings": 128,
    "pad_token_id": 0,
    "eos_token_id": 1,
}


LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def tiny(kind: str, dtype: torch.dtype = torch.float32, **shape: Any) -> Any:
    """A tiny random model of `kind`; `shape` overrides SHAPE's sizes."""
    torch.manual_seed(0)
    shape = {**SHAPE, **shape}
    if kind == "llama":  # tied embeddings, as SmolLM2's
        model = LlamaForCausalLM(LlamaConfig(**shape, tie_word_embeddings=True))
    elif kind == "llama3":  # Llama 3.x's RoPE: frequencies rescaled by band
        model = LlamaForCausalLM(LlamaConfig(**shape, rope_parameters=LLAMA3_ROPE))
    else:  # qwen2: biases on q, k and v
        model = Qwen2ForCausalLM(Qwen2Config(**shape, tie_word_embeddings=False))
    with torch.no_grad():  # random weights this small give flat logits: sharpen them so argmaxes don't tie
        model.lm_head.weight.mul_(8)
    return model.to(dtype).eval()


def greedy_config(new_tokens: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=new_tokens, do_sample=False, pad_token_id=0, eos_token_id=1)


def fused_copy(model: Any) -> Any:
    fused = copy.deepcopy(model)
    fuse_model(fused)
    return fused


def ours(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int
) -> list[list[int]]:
    fused = fused_copy(model)
    with torch.inference_mode():
        output = decode(Decoder(fused), input_ids, attention_mask, greedy_config(new_tokens), [])
    return output[:, input_ids.shape[1] :].tolist()


def theirs(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, new_tokens: int
) -> list[list[int]]:
    with torch.inference_mode():
        output = model.generate(
            input_ids=input_ids, attention_mask=attention_mask, generation_config=greedy_config(new_tokens)
        )
    return output[:, input_ids.shape[1] :].tolist()
