"""The KV cache of our decoder (function.engine.decoder): keys and values for every layer, one row
per sequence, preallocated, in whole blocks of columns."""

from __future__ import annotations

import torch

BLOCK = 64  # a decoding row attends to its cache columns up to a multiple of this, the rest masked


class KVCache:
    """Keys and values for every layer, preallocated to the longest sequence a call can reach (in
    whole `BLOCK`s), in float32 (attention runs in float32, as transformers' does inside its fused
    kernel), or in bfloat16 for a bf16 model stepped in C++ (`Decoder.cache_dtype`: half the memory
    and the reads; its attention still sums in float32). `torch.empty`: pages are touched only as
    positions are written, and columns are zeroed a block ahead of the writes (`prepare`), so that
    no attention reads `torch.empty`'s leftovers."""

    def __init__(
        self,
        layers: int,
        batch: int,
        kv_heads: int,
        length: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        length = -(-length // BLOCK) * BLOCK
        shape = (batch, kv_heads, length, head_dim)
        self.keys = [torch.empty(shape, dtype=dtype) for _ in range(layers)]
        self.values = [torch.empty(shape, dtype=dtype) for _ in range(layers)]
        self.length = length
        self.finite = [0] * batch  # each row's columns below this hold keys and values, or zeros
        self.first_row = 0  # this cache's row 0 is row `first_row` of `finite` (a `row` view's)

    def prepare(self, row: int, start: int, end: int, span: int) -> None:
        """Before row `row` writes columns `start .. end-1` and attends to columns below `span`:
        zero the columns below `span` (to the end of their block) that neither hold keys nor are
        about to. A masked attention weight is 0, and 0 times a leftover NaN is NaN."""
        done = self.finite[self.first_row + row]
        if span <= done:
            return
        stop = min(self.length, -(-span // BLOCK) * BLOCK)
        for tensor in (*self.keys, *self.values):
            if start > done:
                tensor[row, :, done:start].zero_()
            tensor[row, :, max(done, end) : stop].zero_()
        self.finite[self.first_row + row] = stop

    def row(self, index: int) -> KVCache:
        """Row `index` alone, as a cache of one row (views: writes land in this cache)."""
        view = KVCache.__new__(KVCache)
        view.keys = [keys[index : index + 1] for keys in self.keys]
        view.values = [values[index : index + 1] for values in self.values]
        view.length, view.finite, view.first_row = self.length, self.finite, self.first_row + index
        return view
