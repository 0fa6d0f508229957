"""Our own forward pass for Llama-family models on CPU: the decode step without transformers' layers.

transformers' eager decode step spends most of a small model's token outside the matmuls (module
calls, masks, cache objects), and PyTorch's default bfloat16 matmul at batch 1 is about 3x slower
than oneDNN's on weights packed for it (docs/benchmarks.md). `Decoder` walks the same modules'
weights with a preallocated KV cache and a handful of tensor ops per layer; `decoder_choice.fuse_model`
first fuses q/k/v and gate/up and packs them for oneDNN in place (`function.engine.projections`:
transformers' own forward keeps working on the model).

Rows of a batch are never padded: each prompt is prefilled alone into its row of the cache, and
each decode step writes a row's key at its own column. Greedy rows that must decode bitwise as
alone (function.engine.calibration measured they can: `batch_exact`) also attend alone and leave
the batch when they finish; other batches (sampled rows, float32's, BATCH_REDUCED_PRECISION's)
attend together. Which models it takes, and their preparation: function.engine.decoder_choice.

What it covers (anything else decodes with transformers, and /model_info says why): model types
in `decoder_choice.MODEL_TYPES` with SiLU MLPs, RoPE whose frequencies do not change with the length (default,
linear, llama3, yarn: the model's own), full attention (no sliding window), on CPU, no adapters
served per request, no TORCH_COMPILE. Linear layers may be plain, or our int8 /
int4 ones (`function.weights.cpu_quantization`). The loop that samples with it is
`function.engine.decode_loop`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional

from function.engine.projections import Projection

FINITE_CHUNK = 64  # KV cache columns zeroed at a time for rows that attend together


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
        self.length = length
        self.finite_until = 0  # columns below this hold keys and values, or zeros

    def ensure_finite(self, end: int) -> None:
        """Columns below `end` hold written keys and values or zeros, never `torch.empty`'s leftovers:
        rows that attend together read the columns beyond a shorter row's end, masked, and a masked
        weight of 0 times a leftover NaN is NaN. Zeroed a chunk at a time, ahead of every write: call
        it before a step writes at any column at or above `finite_until` (a prompt: before it)."""
        if end <= self.finite_until:
            return
        stop = min(self.length, max(end, self.finite_until + FINITE_CHUNK))
        for tensor in (*self.keys, *self.values):
            tensor[:, :, self.finite_until : stop].zero_()
        self.finite_until = stop

    def row(self, index: int) -> KVCache:
        """Row `index` alone, as a cache of one row (views: writes land in this cache)."""
        view = KVCache.__new__(KVCache)
        view.keys = [keys[index : index + 1] for keys in self.keys]
        view.values = [values[index : index + 1] for values in self.values]
        view.length, view.finite_until = self.length, self.finite_until
        return view


class Decoder:
    """The forward pass over a supported model's weights (`decoder_choice.fuse_model` first)."""

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
        # The model's own RoPE frequencies and scaling (default, linear, llama3, yarn...: all fixed).
        rotary = model.model.rotary_emb
        self.inv_freq = rotary.inv_freq.detach().float().clone()
        self.attention_scaling = float(rotary.attention_scaling)
        self._cos = torch.empty(0, self.head_dim, dtype=self.dtype)
        self._sin = torch.empty(0, self.head_dim, dtype=self.dtype)
        self.least_rows: dict[
            int, int
        ] = {}  # fewest rows per matmul call, by projection (`function.engine.calibration`)
        self.measured_rows = 0  # most rows per matmul call `function.engine.calibration` measured
        self.batch_exact = (
            False  # batched rows decode bitwise as alone, measured (`function.engine.calibration`)
        )

    def new_cache(self, batch: int, length: int) -> KVCache:
        return KVCache(len(self.layers), batch, self.kv_heads, length, self.head_dim)

    def _rope_tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions 0..length-1 (grown as needed), as transformers computes them
        (float32, scaled, cast to the model's dtype). The sin's first half is negated: transformers'
        `x * cos + rotate_half(x) * sin` is `x * cos + roll(x, half) * signed_sin`."""
        if self._cos.shape[0] < length:
            size = max(length, 2 * self._cos.shape[0], 256)
            freqs = torch.outer(torch.arange(size, dtype=torch.float32), self.inv_freq)
            cos = torch.cat((freqs, freqs), dim=-1).cos() * self.attention_scaling
            sin = torch.cat((freqs, freqs), dim=-1).sin() * self.attention_scaling
            half = self.head_dim // 2
            self._cos = cos.to(self.dtype)
            self._sin = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1).to(self.dtype)
        return self._cos, self._sin

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return functional.rms_norm(x, (self.hidden_size,), weight, self.eps)

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Logits of the last position of each row, for `ids` [batch, T] placed at cache columns
        `start .. start+T-1` (a prompt: at 0) of rows without padding; `positions` [batch, T] are
        their RoPE positions (the columns). Rows of different lengths: `prefill_row`, `step_rows`."""
        steps = ids.shape[1]
        end = start + steps
        cos, sin = self._angles(positions)
        x: torch.Tensor = self.embed(ids)
        for index, layer in enumerate(self.layers):
            q, k, v = self._attention_inputs(x, layer, cos, sin)
            keys, values = cache.keys[index], cache.values[index]
            keys[:, :, start:end] = k.transpose(1, 2)
            values[:, :, start:end] = v.transpose(1, 2)
            if steps > 1:
                attended = self._attend_prompt(q, k, v)
            else:
                attended = self._attend_token(q, keys[:, :, :end], values[:, :, :end])
            x = self._mlp(x + self._project(layer.o, attended), layer)
        return self._logits(x)

    def prefill_row(self, ids: torch.Tensor, cache: KVCache, row: int) -> torch.Tensor:
        """A prompt's logits (`ids` [T], no padding) into row `row` of `cache`: exactly as alone."""
        return self.forward(ids[None], torch.arange(ids.shape[0])[None], cache.row(row), 0)

    def step_rows(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        *,
        exact: bool = True,
        rows: list[int] | None = None,
    ) -> torch.Tensor:
        """One new token for each row (`tokens` [batch, 1]); row b's earlier keys are at columns
        0 .. positions[b]-1 and its token goes to column positions[b]. Each row attends alone, and
        each matmul runs with the rows `function.engine.calibration` measured to round a row as it is alone:
        then a row's logits are bitwise those of the same row decoded alone (`batch_exact`).
        `exact=False`: the rows attend together, the longer rows' columns masked for the shorter
        (one call instead of one a row: faster, rounded with the batch). `rows` (exact only): the
        cache rows `tokens` belong to, when finished rows are left out (default: all, in order)."""
        batch = tokens.shape[0]
        if rows is None:
            rows = list(range(batch))
        elif not exact:
            raise ValueError("rows attending together take every row of the cache")
        indices = torch.tensor(rows)
        columns = positions[:, 0]
        ends = (columns + 1).tolist()
        longest = max(ends)
        mask = None
        if not exact:
            cache.ensure_finite(longest)
            mask = (torch.arange(longest)[None, :] <= columns[:, None])[:, None, None, :]
        cos, sin = self._angles(positions)
        x: torch.Tensor = self.embed(tokens)
        for index, layer in enumerate(self.layers):
            q, k, v = self._attention_inputs(x, layer, cos, sin)
            keys, values = cache.keys[index], cache.values[index]
            keys[indices, :, columns] = k[:, 0].float()
            values[indices, :, columns] = v[:, 0].float()
            if exact:  # each row's own ops, as `forward` runs them for a row alone
                grouped = self._grouped(q)
                rows_attended = [
                    self._attend_grouped(
                        grouped[at : at + 1],
                        keys[row : row + 1, :, :end],
                        values[row : row + 1, :, :end],
                        None,
                    )
                    for at, (row, end) in enumerate(zip(rows, ends, strict=True))
                ]
                attended = torch.cat(rows_attended).view(batch, 1, -1).to(q.dtype)
            else:
                attended = self._attend_token(q, keys[:, :, :longest], values[:, :, :longest], mask)
            x = self._mlp(x + self._project(layer.o, attended), layer)
        return self._logits(x)

    def _angles(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos_table, sin_table = self._rope_tables(int(positions.max()) + 1)
        # [batch, T, 1, head_dim]: one angle for every head
        return cos_table[positions].unsqueeze(2), sin_table[positions].unsqueeze(2)

    def _attention_inputs(
        self, x: torch.Tensor, layer: Layer, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries, keys (both rotated) and values, [batch, T, heads, head_dim] each."""
        batch, steps = x.shape[:2]
        heads, kv_heads = self.heads, self.kv_heads
        h = self._rms_norm(x, layer.attention_norm)
        qkv = self._project(layer.qkv, h).view(batch, steps, heads + 2 * kv_heads, self.head_dim)
        qk = qkv[:, :, : heads + kv_heads]  # RoPE on the queries and keys at once
        qk = torch.addcmul(qk * cos, qk.roll(self.head_dim // 2, dims=-1), sin)
        return qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, heads + kv_heads :]

    def _mlp(self, x: torch.Tensor, layer: Layer) -> torch.Tensor:
        h = self._rms_norm(x, layer.mlp_norm)
        gate, up = self._project(layer.gate_up, h).split(self.intermediate, dim=-1)
        return x + self._project(layer.down, functional.silu(gate) * up)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        last = self._rms_norm(x[:, -1:], self.norm)
        logits: torch.Tensor = self._project(self.head, last)[:, 0]
        return logits

    def _project(self, projection: Any, x: torch.Tensor) -> torch.Tensor:
        """`projection(x)`; with fewer rows than calibration found the kernel needs to round a row as
        it does in any batch, zero rows are added (and their results dropped); with more rows than it
        measured, the call is cut into calls of at most that many."""
        rows = x.shape[0]
        if self.least_rows and rows > self.measured_rows:
            chunks = range(0, rows, self.measured_rows)
            return torch.cat([self._project(projection, x[at : at + self.measured_rows]) for at in chunks])
        least = self.least_rows.get(id(projection), 1)
        if rows >= least:
            output: torch.Tensor = projection(x)
            return output
        padded: torch.Tensor = projection(torch.cat((x, x.new_zeros((least - rows, *x.shape[1:])))))
        return padded[:rows]

    def _attend_prompt(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The prompt's tokens ([batch, T, heads, head_dim] each): PyTorch's fused causal attention."""
        batch, steps = q.shape[:2]
        attended = functional.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            scale=self.scale,
            enable_gqa=self.group > 1,
        )
        return attended.transpose(1, 2).reshape(batch, steps, self.heads * self.head_dim)

    def _attend_token(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One new token per row, in float32. `mask` [batch, 1, 1, columns]: False where a row has no
        key (beyond a shorter row's end)."""
        attended = self._attend_grouped(self._grouped(q), keys, values, mask)
        return attended.view(q.shape[0], 1, self.heads * self.head_dim).to(q.dtype)

    def _grouped(self, q: torch.Tensor) -> torch.Tensor:
        """Queries [batch, 1, heads, head_dim] as [batch, kv_heads, group, head_dim]: the query heads
        that share a key head side by side; float32, scaled."""
        batch = q.shape[0]
        grouped: torch.Tensor = (
            q.reshape(batch, self.kv_heads, self.group, self.head_dim).float() * self.scale
        )
        return grouped

    def _attend_grouped(
        self, grouped: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None
    ) -> torch.Tensor:
        scores = torch.matmul(grouped, keys.transpose(-1, -2))
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), values)


def _plain_embedding(model: Any) -> bool:
    return type(model.model.embed_tokens) is nn.Embedding
