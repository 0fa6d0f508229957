"""Our own forward pass for Llama-family models on CPU: the decode step without transformers' layers.

transformers' eager decode step spends most of a small model's token outside the matmuls (module
calls, masks, cache objects), and PyTorch's default bfloat16 matmul at batch 1 is about 3x slower
than oneDNN's on weights packed for it (docs/benchmarks.md). `Decoder` walks the same modules'
weights with a preallocated KV cache and a handful of tensor ops per layer; `decoder_choice.fuse_model`
first fuses q/k/v and gate/up and packs them for oneDNN in place (`function.engine.projections`:
transformers' own forward keeps working on the model).

Rows of a batch are never padded: each prompt is prefilled alone into its row of the cache, and
each decode step writes a row's key at its own column. Greedy rows that must decode bitwise as
alone (function.engine.calibration measured they can: `batch_exact`) attend to their keys up to a
whole block (`_span`), as alone, in one call with the neighbouring rows of their block (measured
too: `attend_runs`), and leave the batch when they finish; other batches (sampled rows,
float32's, BATCH_REDUCED_PRECISION's) attend together. Where `native` is set, a token's layers
step in C++ instead (function.engine.native): each row attends to its own keys alone there, so
the blocks and runs are the Python step's alone; so do prompts of up to `NATIVE_PROMPT_TOKENS`.
Which models it takes, and their preparation: function.engine.decoder_choice.

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

from function.engine.kv_cache import BLOCK, KVCache
from function.engine.projections import Projection

# Prompts up to this many tokens prefill in C++ where `native` is set: 1.44x at 20 tokens, 1.08x at
# 128, 0.90x at 256 on SmolLM2-135M (its attention is a loop a token; PyTorch's fused one wins later).
NATIVE_PROMPT_TOKENS = 128


@dataclass(frozen=True)
class Layer:
    attention_norm: torch.Tensor
    mlp_norm: torch.Tensor
    qkv: Projection  # q, k and v side by side
    o: Projection
    gate_up: Projection  # gate and up side by side
    down: Projection


def _span(end: int, blocks: bool) -> int:
    """The columns a decoding row whose keys end at `end` attends to. `blocks` (a decoder calibrated
    for exact batching: `Decoder.block_spans`): `end` rounded up to a whole `BLOCK`, the columns
    beyond `end` masked. A row then attends to as many columns alone as in any batch where it ends
    in the same block, so the rows of a block attend in one call bitwise as alone. Else `end`: no
    mask (alone, as on Lambda: the mask and the extra columns measured 2-3 % of a 4-bit step)."""
    return -(-end // BLOCK) * BLOCK if blocks else end


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
        self.norm = _doubled(model.model.norm.weight)
        self.head = model.lm_head  # a projection, or (tied) transformers' own linear layer
        self.layers = [
            Layer(
                attention_norm=_doubled(layer.input_layernorm.weight),
                mlp_norm=_doubled(layer.post_attention_layernorm.weight),
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
        self._rotations = torch.empty(0, self.head_dim // 2, dtype=torch.complex64)
        self._head_scales = torch.tensor([self.scale] * self.heads + [1.0] * self.kv_heads)[:, None]
        self.least_rows: dict[
            int, int
        ] = {}  # fewest rows per matmul call, by projection (`function.engine.calibration`)
        self.measured_rows = 0  # most rows per matmul call `function.engine.calibration` measured
        self.block_spans = False  # rows attend to whole blocks of columns (`_span`): set by calibration
        self.attend_runs = True  # neighbouring rows of one span attend in one call (`_runs`: calibrated)
        self.batch_exact = (
            False  # batched rows decode bitwise as alone, measured (`function.engine.calibration`)
        )
        self.lookup_tokens = 0  # greedy rows draft this many tokens a step at most (engine.speculation)
        self.native: Any = None  # the layer loop in C++ (`_decode_layers`; function.engine.native)
        self.native_head: Any = None  # our matmul for the output layer (`_project`; native.native_head)
        # every matmul on our own kernels (the layers' and the output layer's): a row's products are
        # alike in a call of any rows, by construction (native_matmul.h; `decoder_choice._exact_rows`)
        self.rows_alike = False

    @property
    def cache_dtype(self) -> torch.dtype:
        """bfloat16 for a bf16 model stepped in C++ (transformers caches a bf16 model's keys and values
        in bf16 too); float32 where the Python step attends (its matmuls take one dtype)."""
        return torch.bfloat16 if self.native is not None and self.dtype == torch.bfloat16 else torch.float32

    def new_cache(self, batch: int, length: int) -> KVCache:
        return KVCache(len(self.layers), batch, self.kv_heads, length, self.head_dim, self.cache_dtype)

    def _rope_rotations(self, length: int) -> torch.Tensor:
        """RoPE's rotation for positions 0..length-1 (grown as needed): [length, head_dim / 2],
        complex, scaled as the model's rotary embedding scales its cos and sin."""
        if self._rotations.shape[0] < length:
            size = max(length, 2 * self._rotations.shape[0], 256)
            freqs = torch.outer(torch.arange(size, dtype=torch.float32), self.inv_freq)
            self._rotations = torch.polar(torch.full_like(freqs, self.attention_scaling), freqs)
        return self._rotations

    def _rms_norm(self, x: torch.Tensor, doubled: torch.Tensor) -> torch.Tensor:
        """RMSNorm as PyTorch's fused layer norm of [x, -x] (mean 0, variance mean(x^2)), whose
        second half `doubled`'s zeros drop: one kernel instead of rms_norm's seven (2x faster at
        batch 1). `doubled`: the norm's weight, then as many zeros (`_doubled`)."""
        width = x.shape[-1]
        normed = functional.layer_norm(torch.cat((x, -x), dim=-1), (2 * width,), doubled, None, self.eps)
        return normed[..., :width]

    def forward(self, ids: torch.Tensor, positions: torch.Tensor, cache: KVCache, start: int) -> torch.Tensor:
        """Logits of the last position of each row, for `ids` [batch, T] placed at cache columns
        `start .. start+T-1` (a prompt: at 0) of rows without padding; `positions` [batch, T] are
        their RoPE positions (the columns). Rows of different lengths: `prefill_row`, `step_rows`."""
        steps = ids.shape[1]
        if steps == 1:  # a token a row: as `step_rows` decodes it (bitwise as alone)
            return self._step(ids, positions, cache, list(range(ids.shape[0])), exact=True)
        end = start + steps
        if self.native is not None and ids.shape[0] == 1 and steps <= NATIVE_PROMPT_TOKENS:
            # A short prompt in C++ too: its tokens as rows of one cache row, each writing its key
            # at its column and attending to the columns up to it (causal), all keys written first.
            cache.prepare(0, start, end, end)
            tokens = self._native_layers(
                self.embed(ids[0][:, None]), cache, [0] * steps, positions[0], prompt=True
            )
            return self._logits(tokens[-1:].transpose(0, 1))
        for row in range(ids.shape[0]):
            cache.prepare(row, start, end, end)
        rotation = self._rotation(positions)
        x: torch.Tensor = self.embed(ids)
        for index, layer in enumerate(self.layers):  # the prompt's tokens attend to each other, causally
            q, k, v = self._attention_inputs(x, layer, rotation)
            keys, values = cache.keys[index], cache.values[index]
            keys[:, :, start:end] = k.transpose(1, 2)
            values[:, :, start:end] = v.transpose(1, 2)
            # the keys and values as the cache holds them (rounded to a bf16 cache), in float32
            attended = self._attend_prompt(q, keys[:, :, start:end].float(), values[:, :, start:end].float())
            x = self._mlp(x + self._project(layer.o, attended.to(x.dtype)), layer)
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
        if rows is None:
            rows = list(range(tokens.shape[0]))
        elif not exact:
            raise ValueError("rows attending together take every row of the cache")
        return self._step(tokens, positions, cache, rows, exact=exact)

    def _step(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVCache, rows: list[int], *, exact: bool
    ) -> torch.Tensor:
        columns = positions[:, 0]
        ends = (columns + 1).tolist()
        if self.native is not None:  # each row attends to its own keys alone, whatever the batch
            for row, end in zip(rows, ends, strict=True):
                cache.prepare(row, end - 1, end, end)
            return self._logits(self._native_layers(self.embed(tokens), cache, rows, columns))
        if cache.keys[0].dtype != torch.float32:
            raise RuntimeError("a bf16 cache is the C++ step's; the Python step attends over float32")
        spans = [_span(end, self.block_spans) for end in ends] if exact else [max(ends)] * len(ends)
        for row, end, span in zip(rows, ends, spans, strict=True):
            cache.prepare(row, end - 1, end, span)
        # Calls of neighbouring rows that attend to the same columns (exact), or of every row (not)
        runs = _runs(rows, spans, joined=self.attend_runs) if exact else [(0, len(rows), 0, spans[0])]
        hidden = [  # each call's columns beyond each row's keys
            (torch.arange(span)[None, :] > columns[at:stop, None])[:, None, None, :]
            if span > min(ends[at:stop])
            else None
            for at, stop, _, span in runs
        ]
        rotation = self._rotation(positions)
        x = self._decode_layers(
            self.embed(tokens), rotation, cache, torch.tensor(rows), columns, runs, hidden
        )
        return self._logits(x)

    def _native_layers(
        self, x: torch.Tensor, cache: KVCache, rows: list[int], columns: torch.Tensor, *, prompt: bool = False
    ) -> torch.Tensor:
        """`_decode_layers` in C++ (function.engine.native): the same matmul calls, our own loops
        between them, each row attending to its own keys `0 .. columns[b]` alone (no runs, no mask).
        `prompt`: the rows are one prompt's tokens, whose matmuls run as one call of all of them
        (a prompt is always prefilled alone: no batch to round as)."""
        first = self.layers[0]
        least = [self.least_rows.get(id(p), 1) for p in (first.qkv, first.o, first.gate_up, first.down)]
        measured = self.measured_rows if self.least_rows else 0
        if prompt:
            least, measured = [1, 1, 1, 1], 0
        turns = torch.view_as_real(self._rope_rotations(int(columns.max()) + 1)[columns])
        output: torch.Tensor = self.native.decode(
            x, turns, cache.keys, cache.values, rows, columns.tolist(), least, measured, prompt
        )
        return output

    def _decode_layers(
        self,
        x: torch.Tensor,
        rotation: torch.Tensor,
        cache: KVCache,
        rows: torch.Tensor,
        columns: torch.Tensor,
        runs: list[tuple[int, int, int, int]],
        hidden: list[torch.Tensor | None],
    ) -> torch.Tensor:
        """Every layer for one token a row: `x` [batch, 1, hidden size] (embedded); the token's key
        and value go to cache row `rows[b]`, column `columns[b]`; each run of `_runs` attends in one
        call, its masked columns `hidden`. (`_native_layers` where `native` is set.)"""
        for index, layer in enumerate(self.layers):
            q, k, v = self._attention_inputs(x, layer, rotation)
            keys, values = cache.keys[index], cache.values[index]
            keys[rows, :, columns] = k[:, 0]
            values[rows, :, columns] = v[:, 0].float()
            calls = [
                self._attend(
                    q[at:stop],
                    keys[row : row + stop - at, :, :span],
                    values[row : row + stop - at, :, :span],
                    mask,
                )
                for (at, stop, row, span), mask in zip(runs, hidden, strict=True)
            ]
            attended = calls[0] if len(calls) == 1 else torch.cat(calls)
            x = self._mlp(x + self._project(layer.o, attended.to(x.dtype)), layer)
        return x

    def _rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """RoPE's rotation at `positions` [batch, T], for every query head and key head: [batch, T,
        heads + kv_heads, head_dim / 2]. The queries' also scale them by attention's 1/sqrt(head_dim)."""
        return self._rope_rotations(int(positions.max()) + 1)[positions].unsqueeze(2) * self._head_scales

    def _attention_inputs(
        self, x: torch.Tensor, layer: Layer, rotation: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries (scaled, `_rotation`) and keys, rotated, in float32; values in the model's dtype:
        [batch, T, heads, head_dim] each. RoPE pairs element i of a head with element i + head_dim/2
        (transformers' `rotate_half`): each pair becomes a complex number, rotated by one
        multiplication. The rotated pairs stay side by side, in queries and keys alike: their dot
        products are the same."""
        batch, steps = x.shape[:2]
        heads, kv_heads, half = self.heads, self.kv_heads, self.head_dim // 2
        h = self._rms_norm(x, layer.attention_norm)
        qkv = self._project(layer.qkv, h).view(batch, steps, heads + 2 * kv_heads, self.head_dim)
        pairs = torch.empty(batch, steps, heads + kv_heads, half, 2)
        pairs.copy_(qkv[:, :, : heads + kv_heads].unflatten(-1, (2, half)).transpose(-1, -2))
        rotated = torch.view_as_real(torch.view_as_complex(pairs) * rotation).flatten(-2)
        return rotated[:, :, :heads], rotated[:, :, heads:], qkv[:, :, heads + kv_heads :]

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
        if projection is self.head and self.native_head is not None:  # each row alone, by construction
            head: torch.Tensor = self.native_head(x)
            return head
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

    def _attend(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, hidden: torch.Tensor | None
    ) -> torch.Tensor:
        """One new token per row, in float32 (as transformers' fused kernel computes attention):
        queries [batch, 1, heads, head_dim] (scaled), keys and values [batch, kv_heads, columns,
        head_dim]; `hidden` [batch, 1, 1, columns] (None: none): True where a row has no key (beyond its end:
        `_span`, or a shorter row's end). Three calls: measured faster at one query than PyTorch's
        fused kernel, which took 30 us a call here. Returns [batch, 1, heads * head_dim]."""
        batch = q.shape[0]
        grouped = q.reshape(batch, self.kv_heads, self.group, self.head_dim)  # heads sharing a key head
        scores = torch.matmul(grouped, keys.transpose(-1, -2))
        if hidden is not None:
            scores.masked_fill_(hidden, float("-inf"))
        attended = torch.matmul(torch.softmax(scores, dim=-1), values)
        return attended.view(batch, 1, self.heads * self.head_dim)

    def _attend_prompt(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """A prompt's tokens attend causally to each other (`_attend`'s shapes, T queries each):
        PyTorch's fused kernel."""
        batch, steps = q.shape[:2]
        attended = functional.scaled_dot_product_attention(
            q.transpose(1, 2), keys, values, is_causal=True, scale=1.0, enable_gqa=self.group > 1
        )
        return attended.transpose(1, 2).reshape(batch, steps, self.heads * self.head_dim)


def _runs(rows: list[int], spans: list[int], *, joined: bool) -> list[tuple[int, int, int, int]]:
    """The batch cut into runs of neighbouring cache rows that attend to the same columns
    (`_span`), as `(at, stop, first row, span)`: `tokens[at:stop]` are cache rows `first row ..`
    and attend in one call (`joined=False`: a run a row). One call over rows of one span gave each
    row bitwise what a call of that row alone does, on every shape tried (PyTorch's batched matmul
    runs each row's product alike; `function.engine.calibration` measures it at load), and saves
    the per-call cost of the rest: 8 rows, 23.4 -> 15.7 ms a step on SmolLM2-135M."""
    runs: list[tuple[int, int, int, int]] = []
    for at, (row, span) in enumerate(zip(rows, spans, strict=True)):
        if (
            joined
            and runs
            and runs[-1][1] == at
            and runs[-1][2] + at - runs[-1][0] == row
            and runs[-1][3] == span
        ):
            runs[-1] = (runs[-1][0], at + 1, runs[-1][2], span)
        else:
            runs.append((at, at + 1, row, span))
    return runs


def _plain_embedding(model: Any) -> bool:
    return type(model.model.embed_tokens) is nn.Embedding


def _doubled(weight: torch.Tensor) -> torch.Tensor:
    """An RMSNorm weight followed by as many zeros: `Decoder._rms_norm`'s layer-norm weight."""
    return torch.cat((weight.detach(), torch.zeros_like(weight))).contiguous()
