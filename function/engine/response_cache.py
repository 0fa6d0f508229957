"""A bounded cache of completions for deterministic requests: greedy, or sampled with a seed.

Keyed by the model's identity and everything that shapes the output (the prompt as the model
sees it, every sampling parameter). The time budget is left out of the key, and a result the
budget cut short is never stored. Cleared when the model is swapped.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from function.engine.types import Completion, SamplingParams

if TYPE_CHECKING:
    from function.weights.loading import LoadedModel


class ResponseCache:
    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[Any, Completion] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    @property
    def enabled(self) -> bool:
        return self.max_entries > 0

    def key(
        self, loaded: LoadedModel, prompt: str, params: SamplingParams, add_special_tokens: bool
    ) -> Any | None:
        """None when the request is not deterministic (sampling without a seed) or caching is off."""
        if not self.enabled or not (params.greedy or params.seed is not None):
            return None
        identity = (loaded.path, loaded.loaded_at.isoformat(), loaded.quantization, loaded.dtype)
        return identity, prompt, add_special_tokens, replace(params, max_time=None)

    def get(self, key: Any) -> Completion | None:
        with self._lock:
            found = self._entries.get(key)
            if found is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return found

    def put(self, key: Any, completion: Completion) -> None:
        if "time" in completion.finish_reasons:
            return  # cut short by a time budget: not what the same request gets with time to spare
        with self._lock:
            self._entries[key] = completion
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        return len(self._entries)
