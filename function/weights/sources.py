"""Everything one load needs, resolved to local directories: the base model, the adapter that
MODEL_PATH may be, and the named adapters served beside the base (ADAPTERS).

An adapter's base comes from BASE_MODEL_PATH, else from its `base_model_name_or_path` when that
is a local directory or an `s3://` URI (a hub id is refused: this service is offline). Paths
known up front are resolved concurrently (on Lambda each `s3://` prefix has its own prefetch).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from function.errors import ModelLoadError
from function.weights.fetcher import FetchResult
from function.weights.resolve import ResolvedWeights, adapter_base, resolve_weights

PathCheck = Callable[[str], None]


@dataclass(frozen=True)
class ModelSources:
    base: ResolvedWeights
    adapter: ResolvedWeights | None = None  # MODEL_PATH, when it is an adapter
    extra: dict[str, ResolvedWeights] = field(default_factory=dict)  # ADAPTERS, by name
    seconds: float = 0.0

    @property
    def name(self) -> str:
        return self.adapter.name if self.adapter is not None else self.base.name

    def fetch(self) -> FetchResult | None:
        """All downloads as one: bytes and files added up; the time of the longest (they run concurrently,
        and a prefetched one ran during the entry's imports: the resolution only waited for the rest)."""
        fetched = [w.fetch for w in (self.base, self.adapter, *self.extra.values()) if w and w.fetch]
        if not fetched:
            return None
        return FetchResult(
            local_dir=fetched[0].local_dir,
            files=sum(f.files for f in fetched),
            bytes_total=sum(f.bytes_total for f in fetched),
            bytes_downloaded=sum(f.bytes_downloaded for f in fetched),
            seconds=max(f.seconds for f in fetched),
            from_cache=all(f.from_cache for f in fetched),
            in_memory=any(f.in_memory for f in fetched),
        )


def _base_of(adapter: ResolvedWeights, base_model_path: str | None) -> str:
    if base_model_path:
        return base_model_path
    named = adapter_base(adapter.local_dir)
    if named and (named.startswith("s3://") or Path(named).expanduser().is_dir()):
        return named
    raise ModelLoadError(
        f"the adapter's base model {named!r} is not a local directory or s3:// URI (model hub ids are not "
        "fetched: this service is offline); set BASE_MODEL_PATH (--base_model_path) to the base model"
        if named
        else "the adapter names no base model: set BASE_MODEL_PATH (--base_model_path) to it",
        field="base_model_path",
    )


def resolve_sources(
    model_path: str,
    cache_dir: Path,
    *,
    base_model_path: str | None = None,
    adapters: Mapping[str, str] | None = None,
    check_path: PathCheck | None = None,
    in_memory: bool = False,
) -> ModelSources:
    """Resolve MODEL_PATH, its base when it is an adapter, and the named adapters.

    `check_path` (the allow-list of /load_model) sees every path before any I/O on it; a base
    named only inside the adapter is checked once the adapter's config is read. `in_memory` fetches an
    `s3://` model's safetensors into memory; adapters are small and go to the disk cache whole.
    """
    started = time.perf_counter()
    adapters = dict(adapters or {})
    check = check_path or (lambda _: None)
    upfront = [model_path, *([base_model_path] if base_model_path else []), *adapters.values()]
    for path in upfront:
        check(path)
    with ThreadPoolExecutor(max_workers=max(1, len(upfront)), thread_name_prefix="resolve") as pool:
        resolve = partial(resolve_weights, cache_dir=cache_dir, check_path=check_path, in_memory=in_memory)
        resolving = {path: pool.submit(resolve, path) for path in dict.fromkeys(upfront)}
        first = resolving[model_path].result()
        if first.kind == "adapter" and adapters:
            raise ModelLoadError(
                "MODEL_PATH is an adapter and ADAPTERS is set: set MODEL_PATH to the base model and list "
                "every adapter in ADAPTERS",
                field="adapters",
            )
        base_path = model_path if first.kind == "model" else _base_of(first, base_model_path)
        if base_path not in resolving:
            check(base_path)
            resolving[base_path] = pool.submit(resolve, base_path)
        base = resolving[base_path].result()
        extra = {name: resolving[path].result() for name, path in adapters.items()}
    if base.kind != "model":
        raise ModelLoadError("the base model path holds an adapter, not a model", field="base_model_path")
    for name, resolved in extra.items():
        if resolved.kind != "adapter":
            raise ModelLoadError(
                f"ADAPTERS entry {name!r} is not a PEFT adapter directory (adapter_config.json)",
                field="adapters",
            )
    return ModelSources(
        base=base,
        adapter=first if first.kind == "adapter" else None,
        extra=extra,
        seconds=time.perf_counter() - started,
    )
