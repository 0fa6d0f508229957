"""Weights straight from S3 into memory: no weight byte is written to disk (SnapStart's 512 MB `/tmp`).

- Each `*.safetensors` object is read with concurrent ranged GETs into one anonymous memory map of its
  size, allocated up front (after checking the memory left), and verified there: the publish manifest's
  SHA-256, else the size and S3's full-object checksum.
- The small files (config, tokenizer, the shard index) go to a local directory as usual, since
  transformers reads them from one; the local cache key and the flock are the disk fetcher's.
- `state_dict` turns the buffers into tensors without a second copy: tensors already in the model's
  dtype are views of the buffers, and a file whose tensors are converted (bf16 weights on a float32
  CPU model, say) gives its pages back to the system as its tensors are converted, so a load never
  holds much more than the model itself.
"""

from __future__ import annotations

import json
import mmap
import struct
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from function.errors import ModelLoadError
from function.weights.checkpoint import WEIGHTS_INDEX_NAME, Checkpoint
from function.weights.fetcher import FetchResult, ModelFetcher, RemoteFile
from function.weights.integrity import Manifest, verify_bytes
from function.weights.s3 import S3Location

MEMORY_CACHE_DIR = "in-memory"  # beside the disk cache: its directories hold no weights
READ_SIZE = 1024 * 1024
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own cap on a header
SAFETENSORS_DTYPES = {
    "F64": "float64",
    "F32": "float32",
    "F16": "float16",
    "BF16": "bfloat16",
    "I64": "int64",
    "I32": "int32",
    "I16": "int16",
    "I8": "int8",
    "U8": "uint8",
    "BOOL": "bool",
}


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str  # a torch dtype name
    shape: tuple[int, ...]
    start: int  # absolute offsets in the file
    end: int


class WeightFile:
    """One safetensors file in memory: the buffer and its parsed header."""

    def __init__(self, name: str, buffer: mmap.mmap) -> None:
        self.name = name
        self.buffer = buffer
        self.tensors = parse_header(name, buffer)

    def release(self, start: int, end: int) -> None:
        """Give the whole pages inside [start, end) back to the system (their bytes read as zero after)."""
        first = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first:
            self.buffer.madvise(mmap.MADV_DONTNEED, first, last - first)


def anonymous_memory(size: int) -> mmap.mmap:
    """Private anonymous memory (a shared mapping would be shmem: its pages are not freed by madvise)."""
    return mmap.mmap(-1, max(1, size), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)


def parse_header(name: str, buffer: Any) -> list[TensorEntry]:
    """The tensors a safetensors file holds, in file order, each inside the file and well formed."""
    size = len(buffer)
    if size < 8:
        raise ModelLoadError(f"{name}: not a safetensors file (shorter than its header)", field="model_path")
    (length,) = struct.unpack("<Q", buffer[:8])
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise ModelLoadError(f"{name}: the safetensors header is larger than the file", field="model_path")
    try:
        header = json.loads(bytes(buffer[8 : 8 + length]))
        entries = [
            TensorEntry(
                key,
                SAFETENSORS_DTYPES[value["dtype"]],
                tuple(int(n) for n in value["shape"]),
                8 + length + int(value["data_offsets"][0]),
                8 + length + int(value["data_offsets"][1]),
            )
            for key, value in header.items()
            if key != "__metadata__"
        ]
    except (ValueError, KeyError, TypeError, IndexError) as exc:
        raise ModelLoadError(f"{name}: the safetensors header is not valid", field="model_path") from exc
    for entry in entries:
        if not 8 + length <= entry.start <= entry.end <= size:
            raise ModelLoadError(f"{name}: tensor {entry.name} lies outside the file", field="model_path")
    return sorted(entries, key=lambda entry: entry.start)


@dataclass
class InMemoryWeights:
    """A model's safetensors in memory, by file name, and where its small files are."""

    files: dict[str, WeightFile]

    @property
    def names(self) -> set[str]:
        return set(self.files)

    @property
    def nbytes(self) -> int:
        return sum(len(f.buffer) for f in self.files.values())

    def checkpoint(self) -> Checkpoint:
        return Checkpoint({t.name: t.shape for f in self.files.values() for t in f.tensors})

    def state_dict(self, dtype_for: Callable[[str, Any], Any]) -> dict[str, Any]:
        """Tensors over the buffers. `dtype_for(name, file_dtype)` is the dtype the model keeps the
        tensor in: the same gives a view (no copy), another a converted copy, after which the file
        pages behind it are released. The buffers are dropped here; the views keep theirs alive."""
        import torch

        state: dict[str, Any] = {}
        for weight_file in self.files.values():
            released = 0
            for entry in weight_file.tensors:
                stored = getattr(torch, entry.dtype)
                count = (entry.end - entry.start) // stored.itemsize
                if count * stored.itemsize != entry.end - entry.start or _numel(entry.shape) != count:
                    raise ModelLoadError(
                        f"{weight_file.name}: tensor {entry.name}'s bytes do not match its shape",
                        field="model_path",
                    )
                view = torch.frombuffer(weight_file.buffer, dtype=stored, count=count, offset=entry.start)
                view = view.view(entry.shape) if count else torch.empty(entry.shape, dtype=stored)
                target = dtype_for(entry.name, stored)
                if target is None or target == stored:
                    state[entry.name] = view
                    released = entry.end  # a view holds its pages: nothing before it may be released
                    continue
                state[entry.name] = view.to(target)
                del view
                weight_file.release(released, entry.end)
                released = entry.end
        self.files.clear()
        return state


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for n in shape:
        count *= n
    return count


def memory_available() -> int | None:
    """Bytes this process may still allocate: the cgroup's limit less its usage, else MemAvailable."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            limit = Path(limit_file).read_text(encoding="ascii").strip()
            usage = int(Path(usage_file).read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < 1 << 60:
            cgroup = int(limit) - usage
            system = _meminfo_available()
            return min(cgroup, system) if system is not None else cgroup
    return _meminfo_available()


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text(encoding="ascii").splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemoryFetcher(ModelFetcher):
    """`ModelFetcher` with the safetensors kept in memory; see the module docstring.

    The small files are cached on disk under `cache_root/in-memory/` (kept apart from the disk cache,
    whose complete directories hold the weights too)."""

    def __init__(self, cache_root: Path, client: Any | None = None, **options: Any) -> None:
        super().__init__(cache_root / MEMORY_CACHE_DIR, client, **options)
        self.weights = InMemoryWeights({})
        self.available: Callable[[], int | None] = memory_available
        self._listing: list[RemoteFile] = []

    def _fetch_into(
        self, location: S3Location, files: list[RemoteFile], target: Path, started: float
    ) -> FetchResult:
        # A model's weights go to memory; an adapter (adapter_config.json, no config.json) is small and
        # peft reads it from a directory: it goes to disk whole.
        in_memory = _weight_files(files) if any(f.name == "config.json" for f in files) else []
        on_disk = [f for f in files if f not in in_memory]
        memory_bytes = sum(f.size for f in in_memory)
        available = self.available()
        if available is not None and memory_bytes > available:
            raise ModelLoadError(
                f"the weights ({memory_bytes / 1e6:,.0f} MB) do not fit in the memory left "
                f"({available / 1e6:,.0f} MB); give the function more memory or load in 8-bit or 4-bit",
                field="model_path",
            )
        self._listing = files  # the manifest lists the weights too
        manifest = self._manifest(location, files)
        small = super()._fetch_into(location, on_disk, target, started)  # config, tokenizer: on disk
        weights = {f.name: anonymous_memory(f.size) for f in in_memory}
        try:
            tasks = [(f, first, last) for f in in_memory for first, last in _ranges(f.size, self.part_size)]
            with ThreadPoolExecutor(max_workers=self.max_workers, thread_name_prefix="fetch-mem") as pool:
                read = self._read_range
                for _ in pool.map(lambda task: read(task[0], weights[task[0].name], *task[1:]), tasks):
                    pass
                for _ in pool.map(lambda f: self._verify_in_memory(f, weights[f.name], manifest), in_memory):
                    pass
            self.weights = InMemoryWeights({f.name: WeightFile(f.name, weights[f.name]) for f in in_memory})
        except BaseException:
            weights.clear()  # the buffers go with their last reference (a traceback may hold a view)
            raise
        return FetchResult(
            small.local_dir,
            len(files),
            sum(f.size for f in files),
            small.bytes_downloaded + memory_bytes,
            time.perf_counter() - started,
            False,
            in_memory=True,
        )

    def _manifest(self, location: S3Location, files: list[RemoteFile]) -> Manifest | None:
        return super()._manifest(location, self._listing or files)

    def _read_range(self, remote: RemoteFile, buffer: mmap.mmap, first: int, last: int) -> None:
        """GET one byte range straight into its place in the buffer (`ModelFetcher._get_range` retries)."""
        with memoryview(buffer) as view:

            def read(body: Any) -> int:
                position = _read_into(body, view, first, last + 1)
                if getattr(body, "_raw_stream", body).read(1):
                    raise ModelLoadError(
                        f"{remote.name}: S3 returned more bytes than the range asked", field="model_path"
                    )
                return position - first

            self._get_range(remote, first, last, read)

    def _verify_in_memory(self, remote: RemoteFile, buffer: mmap.mmap, manifest: Manifest | None) -> None:
        head = (
            None
            if manifest is not None
            else self.client.head_object(Bucket=remote.bucket, Key=remote.key, ChecksumMode="ENABLED")
        )
        with memoryview(buffer) as data:
            verify_bytes(remote.name, data[: remote.size], manifest, head)


def _read_into(body: Any, view: memoryview, start: int, end: int) -> int:
    """Read the response body straight into `view[start:end]` (no intermediate chunk objects: with 16
    ranges in flight those cost tens of MB); returns where the body ended."""
    raw = getattr(body, "_raw_stream", None)  # botocore's StreamingBody over urllib3's response
    readinto = getattr(raw, "readinto", None)
    position = start
    while position < end:
        if readinto is not None:
            count = readinto(view[position : min(end, position + READ_SIZE)])
        else:
            chunk = body.read(min(READ_SIZE, end - position))
            count = len(chunk)
            view[position : position + count] = chunk
        if not count:
            break
        position += count
    return position


def _weight_files(files: list[RemoteFile]) -> list[RemoteFile]:
    """The safetensors from_pretrained would read: the index's shards when there is an index."""
    weights = [f for f in files if f.name.endswith(".safetensors") and "/" not in f.name]
    if any(f.name == WEIGHTS_INDEX_NAME for f in files):
        return weights  # the index names shards among these; an extra file is merely held too
    named = [f for f in weights if f.name == "model.safetensors"]
    return named or weights


def _ranges(size: int, part_size: int) -> list[tuple[int, int]]:
    return [(start, min(start + part_size, size) - 1) for start in range(0, size, part_size)]


_started: dict[tuple[str, Path], Future[tuple[FetchResult, InMemoryWeights]]] = {}
_started_lock = threading.Lock()


def _fetch(uri: str, cache_root: Path) -> tuple[FetchResult, InMemoryWeights]:
    fetcher = MemoryFetcher(cache_root)
    return fetcher.fetch(uri), fetcher.weights


def prefetch_into_memory(uri: str, cache_root: Path) -> None:
    """Start the fetch in a thread now (the Lambda entry, before it imports torch); the load takes it."""
    with _started_lock:
        if (uri, cache_root) not in _started:
            pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefetch-mem")
            _started[(uri, cache_root)] = pool.submit(_fetch, uri, cache_root)
            pool.shutdown(wait=False)


def fetch_into_memory(uri: str, cache_root: Path) -> tuple[FetchResult, InMemoryWeights]:
    """The prefetch's result when one was started (once: a retry fetches anew), else a fetch now."""
    with _started_lock:
        started = _started.pop((uri, cache_root), None)
    if started is not None:
        try:
            return started.result()
        except ModelLoadError:
            pass  # fetched again below, so the reason is this attempt's
    return _fetch(uri, cache_root)


def model_from_memory(weights: InMemoryWeights, config: Any, dtype: Any, **kwargs: Any) -> Any:
    """`from_pretrained` over the tensors in memory (the class that AutoModelForCausalLM picks for the
    config): the floating-point tensors are converted to `dtype` here, one at a time, so the file's pages
    are released as they go; those already in `dtype` are used in place."""
    from transformers import AutoModelForCausalLM

    try:
        model_class: Any = AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError as exc:
        raise ModelLoadError(
            f"model type {getattr(config, 'model_type', '?')!r} is not a causal language model transformers "
            "knows",
            field="model_path",
        ) from exc
    keep = tuple(getattr(model_class, "_keep_in_fp32_modules", None) or ())

    def dtype_for(name: str, stored: Any) -> Any:
        if not stored.is_floating_point or any(module in name for module in keep):
            return None  # as stored: from_pretrained decides
        return dtype

    state = weights.state_dict(dtype_for)
    return model_class.from_pretrained(None, config=config, state_dict=state, dtype=dtype, **kwargs)
