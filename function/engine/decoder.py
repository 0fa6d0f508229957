"""Our own forward pass for Llama-family models on CPU: the decode step without transformers' layers.

transformers' eager decode step spends most of a small model's token outside the matmuls (module
calls, masks, cache objects), and PyTorch's default bfloat16 matmul at batch 1 is about 3x slower
than oneDNN's on weights packed for it (docs/benchmarks.md). `Decoder` walks the same modules'
weights with a preallocated KV cache and a handful of tensor ops per layer, and the linear layers
are packed for oneDNN in place (`PackedLinear`: transformers' own forward keeps working on them).

What it covers (anything else decodes with transformers, and /model_info says why): model types
in `MODEL_TYPES` with SiLU MLPs, plain RoPE (no scaling), full attention (no sliding window), on
CPU, no adapters served per request, no TORCH_COMPILE. Linear layers may be plain, or our int8 /
int4 ones (`function.weights.cpu_quantization`). The loop that samples with it is
`function.engine.decode_loop`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.nn import functional

from function.engine.projections import (
    Int4Projection,
    Int8Projection,
    PackedProjection,
    Projection,
    fusable,
    fuse_into,
    plain_weights,
    release_pages,
)

if TYPE_CHECKING:
    from function.weights.loading import LoadedModel

logger = logging.getLogger(__name__)

# Same layer layout: RMSNorm, q/k/v/o projections (qwen2: with biases), RoPE, gated SiLU MLP.
MODEL_TYPES = ("llama", "mistral", "qwen2")
KERNELS = {PackedProjection: "oneDNN-packed", Int8Projection: "int8", Int4Projection: "int4"}


@dataclass(frozen=True)
class Layer:
    attention_norm: torch.Tensor
    mlp_norm: torch.Tensor
    qkv: Projection  # q, k and v side by side
    o: Projection
    gate_up: Projection  # gate and up side by side
    down: Projection


class KVCache:
    """Keys and values for every layer, preallocated to the longest sequence a call can reach, in
    float32 (attention runs in float32, as transformers' does inside its fused kernel). `torch.empty`:
    pages are touched only as positions are written."""

    def __init__(self, layers: int, batch: int, kv_heads: int, length: int, head_dim: int) -> None:
        shape = (batch, kv_heads, length, head_dim)
        self.keys = [torch.empty(shape, dtype=torch.float32) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=torch.float32) for _ in range(layers)]


def unsupported_reason(model: Any) -> str | None:
    """Why `Decoder` can't run this model, or None when it can."""
    config = model.config
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} (ours covers {', '.join(MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        return f"RoPE scaling {rope.get('rope_type', rope.get('type'))!r}"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial RoPE"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp"
    body = getattr(model, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(model, "lm_head"):
        return "an unexpected module layout"
    for layer in body.layers:
        attention, mlp = layer.self_attn, layer.mlp
        groups: list[tuple[Any, ...]] = [
            (attention.q_proj, attention.k_proj, attention.v_proj),
            (attention.o_proj,),
            (mlp.gate_proj, mlp.up_proj),
            (mlp.down_proj,),
        ]
        if not all(fusable(group) for group in groups):
            kinds = sorted({type(linear).__name__ for group in groups for linear in group})
            return f"linear layers of kinds {', '.join(kinds)}"
    if not tied_output(model) and not fusable((model.lm_head,)):
        return f"an output layer of kind {type(model.lm_head).__name__}"
    return None


class Decoder:
    """The forward pass over a supported model's weights; `fuse_model` first."""

    def __init__(self, model: Any) -> None:
        config = model.config
        self.dtype = model.model.embed_tokens.weight.dtype if _plain_embedding(model) else model.dtype
        self.heads = config.num_attention_heads
        self.kv_heads = getattr(config, "num_key_value_heads", None) or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.group = self.heads // self.kv_heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        self.hidden_size = config.hidden_size
        self.embed = model.model.embed_tokens
        self.norm = model.model.norm.weight
        self.head = model.lm_head  # a projection, or (tied) transformers' own linear layer
        self.layers = [
            Layer(
                attention_norm=layer.input_layernorm.weight,
                mlp_norm=layer.post_attention_layernorm.weight,
                qkv=layer.self_attn.q_proj.fused,
                o=layer.self_attn.o_proj,
                gate_up=layer.mlp.gate_proj.fused,
                down=layer.mlp.down_proj,
            )
            for layer in model.model.layers
        ]
        self.intermediate = self.layers[0].gate_up.sizes[0] if self.layers else 0
        rope = getattr(config, "rope_parameters", None) or {}
        theta = float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
        # As transformers computes them: float32 frequencies, cos/sin cast to the model's dtype.
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.int64).float() / self.head_dim
        self.inv_freq = 1.0 / (theta**exponents)
        self._cos = torch.empty(0, self.head_dim, dtype=self.dtype)
        self._sin = torch.empty(0, self.head_dim, dtype=self.dtype)

    def new_cache(self, batch: int, length: int) -> KVCache:
        return KVCache(len(self.layers), batch, self.kv_heads, length, self.head_dim)

    def _rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions 0..length-1 (grown as needed). The sin's first half is negated:
        transformers' `x * cos + rotate_half(x) * sin` is `x * cos + roll(x, half) * signed_sin`."""
        if self._cos.shape[0] < length:
            size = max(length, 2 * self._cos.shape[0], 256)
            freqs = torch.outer(torch.arange(size, dtype=torch.float32), self.inv_freq)
            self._cos = torch.cat((freqs, freqs), dim=-1).cos().to(self.dtype)
            self._sin = torch.cat((-freqs.sin(), freqs.sin()), dim=-1).to(self.dtype)
        return self._cos, self._sin

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return functional.rms_norm(x, (self.hidden_size,), weight, self.eps)

    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        start: int,
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Logits of the last position of each row, for `ids` [batch, T] placed at cache columns
        `start .. start+T-1` (a prompt of several tokens: at 0); `positions` [batch, T] are their
        RoPE positions (left padding shifts them). `key_mask` [batch, start+T], True where a column
        holds a real token; None when every column does."""
        batch, steps = ids.shape
        end = start + steps
        heads, kv_heads, head_dim = self.heads, self.kv_heads, self.head_dim
        cos_table, sin_table = self._rope_tables(int(positions.max()) + 1)
        cos = cos_table[positions].unsqueeze(2)  # [batch, T, 1, head_dim]: one angle for every head
        sin = sin_table[positions].unsqueeze(2)
        mask = None
        if steps > 1:
            mask = self._prompt_mask(key_mask, steps) if key_mask is not None else None
        elif key_mask is not None:
            mask = key_mask[:, None, None, :end]
        half = head_dim // 2
        x: torch.Tensor = self.embed(ids)
        for index, layer in enumerate(self.layers):
            h = self._rms_norm(x, layer.attention_norm)
            qkv = layer.qkv(h).view(batch, steps, heads + 2 * kv_heads, head_dim)
            qk = qkv[:, :, : heads + kv_heads]  # RoPE on the queries and keys at once
            qk = torch.addcmul(qk * cos, qk.roll(half, dims=-1), sin)
            keys, values = cache.keys[index], cache.values[index]
            keys[:, :, start:end] = qk[:, :, heads:].transpose(1, 2)
            values[:, :, start:end] = qkv[:, :, heads + kv_heads :].transpose(1, 2)
            if steps > 1:
                attended = self._attend_prompt(
                    qk[:, :, :heads], qkv[:, :, heads + kv_heads :], qk[:, :, heads:], mask
                )
            else:
                attended = self._attend_token(qk[:, :, :heads], keys[:, :, :end], values[:, :, :end], mask)
            x = x + layer.o(attended)
            h = self._rms_norm(x, layer.mlp_norm)
            gate, up = layer.gate_up(h).split(self.intermediate, dim=-1)
            x = x + layer.down(functional.silu(gate) * up)
        last = self._rms_norm(x[:, -1:], self.norm)
        logits: torch.Tensor = self.head(last)[:, 0]
        return logits

    def _prompt_mask(self, key_mask: torch.Tensor, steps: int) -> torch.Tensor:
        """[batch, 1, T, T] booleans for a left-padded prompt: causal, real keys only. A padding
        position looks at itself alone, so its (unused) keys and values stay finite."""
        columns = torch.arange(steps)
        causal = columns[None, :] <= columns[:, None]
        itself = columns[None, :] == columns[:, None]
        return causal[None, None] & (key_mask[:, None, None, :steps] | itself[None, None])

    def _attend_prompt(
        self, q: torch.Tensor, v: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """The prompt's tokens ([batch, T, heads, head_dim] each): PyTorch's fused attention."""
        batch, steps = q.shape[:2]
        attended = functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            is_causal=mask is None,
            scale=self.scale,
            enable_gqa=self.group > 1,
        )
        return attended.transpose(1, 2).reshape(batch, steps, self.heads * self.head_dim)

    def _attend_token(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        """One new token per row: the query heads that share a key head side by side, in float32."""
        batch = q.shape[0]
        grouped = q.reshape(batch, self.kv_heads, self.group, self.head_dim).float()
        scores = torch.matmul(grouped, keys.transpose(-1, -2)) * self.scale
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        attended = torch.matmul(torch.softmax(scores, dim=-1), values)
        return attended.view(batch, 1, self.heads * self.head_dim).to(q.dtype)


def _plain_embedding(model: Any) -> bool:
    return type(model.model.embed_tokens) is nn.Embedding


def tied_output(model: Any) -> bool:
    """Whether the output layer's weight is the input embedding's (SmolLM2, Llama-3.2-1B, Qwen2.5-0.5B)."""
    return model.lm_head.weight is model.model.embed_tokens.weight


def fuse_model(model: Any) -> None:
    """Fuse and pack every layer's projections in place (`unsupported_reason` must be None).

    A tied output layer stays as it is: packing it would hold the embedding twice (SmolLM2-135M:
    +56 MB, Llama-3.2-1B: +525 MB) to save 0.65 ms a token here (docs/benchmarks.md). The pages of
    the weights replaced are given back at once (`release_pages`): they may be views of a file
    mapping or of the weights-in-memory buffers, which the remaining views keep mapped."""
    replaced: list[torch.Tensor] = []
    for layer in model.model.layers:
        for parent, names in (
            (layer.self_attn, ("q_proj", "k_proj", "v_proj")),
            (layer.self_attn, ("o_proj",)),
            (layer.mlp, ("gate_proj", "up_proj")),
            (layer.mlp, ("down_proj",)),
        ):
            replaced.extend(plain_weights(getattr(parent, name) for name in names))
            fuse_into(parent, names)
    if not tied_output(model):
        replaced.extend(plain_weights([model.lm_head]))
        fuse_into(model, ("lm_head",))
    release_pages(replaced, keep=[*model.parameters(), *model.buffers()])


def attach_decoder(loaded: LoadedModel, setting: str, *, compiled: bool) -> LoadedModel:
    """`loaded` with our decoder when it can run the model (its linear layers packed in place), else
    as it was; either way with the reason /model_info shows. Never fails a load: a model ours can't
    take decodes with transformers."""
    reason = _transformers_reason(loaded, setting, compiled=compiled)
    if reason is not None:
        return replace(loaded, decoder=None, decoder_reason=f"transformers: {reason}")
    fuse_model(loaded.model)
    decoder = Decoder(loaded.model)
    kernels = KERNELS[type(decoder.layers[0].o)] if decoder.layers else "no"
    logger.info("decoder: ours (%s matmuls)", kernels)
    reason = (
        f"ours: a {loaded.model.config.model_type} model on CPU ({kernels} matmuls, q/k/v and gate/up fused)"
    )
    return replace(loaded, decoder=decoder, decoder_reason=reason)


def _transformers_reason(loaded: LoadedModel, setting: str, *, compiled: bool) -> str | None:
    if setting == "transformers":
        return "DECODER=transformers"
    if compiled:
        return "TORCH_COMPILE decodes with transformers' static cache"
    if loaded.device != "cpu":
        return f"ours runs on CPU, this model is on {loaded.device}"
    if loaded.adapters or (loaded.adapter is not None and not loaded.adapter_merged):
        return "adapters are applied by PEFT's layers"
    return unsupported_reason(loaded.model)
