"""Weights straight into memory (WEIGHTS_IN_MEMORY) against moto: nothing on disk but the small files,
verified in memory, tensors over the buffers, and the same model as the disk path."""

from __future__ import annotations

import json
import mmap
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from moto import mock_aws
from safetensors.torch import load_file, save_file

from function.engine.types import Quantization
from function.errors import ModelLoadError
from function.weights.fetcher import RemoteFile
from function.weights.loading import load_model
from function.weights.memory import (
    InMemoryWeights,
    MemoryFetcher,
    WeightFile,
    anonymous_memory,
    parse_header,
    prefetch_into_memory,
)
from function.weights.s3 import s3_client
from function.weights.sources import resolve_sources
from tests.support.s3 import upload_model
from tests.support.settings import make_settings

BUCKET = "models"


@pytest.fixture
def s3(aws_credentials: None) -> Iterator[Any]:
    with mock_aws():
        client = s3_client()
        client.create_bucket(Bucket=BUCKET)
        yield client


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and ".locks" not in p.parts)


def test_the_weights_are_fetched_into_memory_and_only_small_files_reach_disk(
    s3: Any, demo_model_dir: Path, tmp_path: Path
) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    fetcher = MemoryFetcher(tmp_path / "cache", s3, part_size=256 * 1024)

    result = fetcher.fetch(f"s3://{BUCKET}/m/")

    on_disk = {p.name for p in files_under(tmp_path / "cache")}
    assert "config.json" in on_disk and "tokenizer.json" in on_disk
    assert not [name for name in on_disk if name.endswith((".safetensors", ".part"))]
    assert result.in_memory and fetcher.weights.names == {"model.safetensors"}
    original = load_file(demo_model_dir / "model.safetensors")
    state = fetcher.weights.state_dict(lambda name, stored: None)  # as stored
    assert state.keys() == original.keys()
    assert all(torch.equal(state[name], original[name]) for name in original)


def test_tensors_in_the_models_dtype_are_views_of_the_buffer(tmp_path: Path) -> None:
    weights = memory_file(tmp_path, {"a": torch.arange(4096, dtype=torch.float32)})
    buffer = weights.files["w.safetensors"].buffer
    start = torch.frombuffer(buffer, dtype=torch.uint8, count=1).data_ptr()

    state = weights.state_dict(lambda name, stored: torch.float32)

    assert start <= state["a"].data_ptr() < start + len(buffer)  # no copy
    assert torch.equal(state["a"], torch.arange(4096, dtype=torch.float32))


def test_converted_tensors_give_the_files_pages_back(tmp_path: Path) -> None:
    # GIVEN bf16 tensors larger than a page each, kept as float32 by the model
    tensors = {f"t{i}": torch.full((8192,), float(i + 1), dtype=torch.bfloat16) for i in range(4)}
    weights = memory_file(tmp_path, tensors)
    weight_file = weights.files["w.safetensors"]
    buffer = weight_file.buffer
    first = weight_file.tensors[0]

    # WHEN they are converted
    state = weights.state_dict(lambda name, stored: torch.float32)

    # THEN the values are right, and the pages behind the converted tensors read as released (zero)
    assert all(torch.equal(state[n], t.float()) for n, t in tensors.items())
    page = -(-first.start // mmap.PAGESIZE) * mmap.PAGESIZE
    assert buffer[page : page + 4096] == bytes(4096)


def test_a_weight_file_that_differs_from_the_manifest_is_refused_in_memory(
    s3: Any, demo_model_dir: Path, tmp_path: Path
) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    tampered = bytearray((demo_model_dir / "model.safetensors").read_bytes())
    tampered[-1] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key="m/model.safetensors", Body=bytes(tampered))

    with pytest.raises(ModelLoadError, match=r"model\.safetensors: SHA-256 differs"):
        MemoryFetcher(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/m/")


def test_without_a_manifest_the_s3_checksum_is_checked_in_memory(
    s3: Any, demo_model_dir: Path, tmp_path: Path
) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir, manifest=False, checksum="SHA256")

    class Corrupting(MemoryFetcher):
        def _read_range(self, remote: RemoteFile, buffer: mmap.mmap, first: int, last: int) -> None:
            super()._read_range(remote, buffer, first, last)
            if first == 0:
                buffer[100] ^= 0xFF  # a bit flipped on the way

    with pytest.raises(ModelLoadError, match="S3 SHA256 checksum mismatch"):
        Corrupting(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/m/")


def test_weights_larger_than_the_memory_left_are_refused_before_any_get(
    s3: Any, demo_model_dir: Path, tmp_path: Path
) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    fetcher = MemoryFetcher(tmp_path / "cache", s3)
    fetcher.available = lambda: 1_000_000

    with pytest.raises(ModelLoadError, match=r"do not fit in the memory left \(1 MB\)"):
        fetcher.fetch(f"s3://{BUCKET}/m/")
    assert not (tmp_path / "cache").exists() or not files_under(tmp_path / "cache")


def test_an_adapter_goes_to_disk_whole(s3: Any, adapter_dir: Path, tmp_path: Path) -> None:
    upload_model(s3, BUCKET, "a/", adapter_dir)

    fetcher = MemoryFetcher(tmp_path / "cache", s3)
    result = fetcher.fetch(f"s3://{BUCKET}/a/")

    assert (result.local_dir / "adapter_model.safetensors").is_file()  # peft reads it from a directory
    assert fetcher.weights.names == set()


@pytest.mark.parametrize(
    "header",
    [
        b"\xff" * 8,  # a header length past the file
        struct.pack("<Q", 2) + b"{]",  # not JSON
        struct.pack("<Q", 60)
        + json.dumps({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 1 << 40]}})
        .encode()
        .ljust(60),  # a tensor outside the file
        struct.pack("<Q", 50)
        + json.dumps({"a": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 4]}})
        .encode()
        .ljust(50),  # an unknown dtype
    ],
)
def test_a_malformed_safetensors_header_is_a_clear_error(header: bytes) -> None:
    with pytest.raises(ModelLoadError, match=r"w\.safetensors: .*(header|outside the file)"):
        parse_header("w.safetensors", header + bytes(16))


@pytest.mark.parametrize("quantization", ["none", "8bit"])
def test_a_model_loaded_from_memory_answers_as_the_one_loaded_from_disk(
    s3: Any, demo_model_dir: Path, tmp_path: Path, quantization: Quantization
) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    uri = f"s3://{BUCKET}/m/"

    answers = {}
    for mode in ("true", "false"):
        settings = make_settings(model_cache_dir=tmp_path / mode, weights_in_memory=mode, cpu_dtype="float32")
        loaded = load_model(uri, quantization, settings, "cpu")
        ids = loaded.tokenizer("Hello there", return_tensors="pt")
        output = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False)
        answers[mode] = (output.tolist(), loaded.fetch.in_memory if loaded.fetch else None)

    assert answers["true"][0] == answers["false"][0]
    assert answers["true"][1] is True and answers["false"][1] is False
    assert not [p for p in files_under(tmp_path / "true") if p.suffix == ".safetensors"]


def memory_file(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> InMemoryWeights:
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    data = path.read_bytes()
    buffer = anonymous_memory(len(data))
    buffer[:] = data
    return InMemoryWeights({"w.safetensors": WeightFile("w.safetensors", buffer)})


def test_the_fetch_time_is_the_downloads_not_the_wait_for_a_prefetch(
    s3: Any, demo_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN a model fetched into memory by a prefetch (as the Lambda entry starts it before its imports)
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    uri = f"s3://{BUCKET}/m/"
    prefetch_into_memory(uri, tmp_path)
    time.sleep(1.0)  # the entry's imports

    # WHEN the load resolves it (the prefetch is done by now: the resolution itself is quick)
    sources = resolve_sources(uri, tmp_path, in_memory=True)

    # THEN the reported fetch is the download's own time and rate, not the resolution's short wait
    fetched = sources.fetch()
    assert fetched is not None and fetched.in_memory and sources.base.fetch is not None
    assert fetched.seconds == sources.base.fetch.seconds
    assert fetched.seconds > sources.seconds


class CutStream:
    """A response body that delivers `limit` bytes of the real one, then fails as a reset connection would
    (`fail=True`) or ends early (`fail=False`)."""

    def __init__(self, body: Any, limit: int, *, fail: bool) -> None:
        self._raw_stream = self
        self.body, self.left, self.fail = body, limit, fail

    def readinto(self, view: memoryview) -> int:
        if self.left <= 0:
            if self.fail:
                raise ConnectionResetError("connection reset mid-body")
            return 0
        data = self.body.read(min(len(view), self.left))
        view[: len(data)] = data
        self.left -= len(data)
        return len(data)

    def read(self, amount: int = -1) -> bytes:
        buffer = bytearray(max(amount, 1))
        return bytes(buffer[: self.readinto(memoryview(buffer))])


def cutting(client: Any, *, times: int, fail: bool) -> Any:
    """`client`, whose first `times` ranged GETs of a safetensors file are cut after 1,000 bytes."""
    real = client.get_object
    cuts = [0]

    def get_object(**kwargs: Any) -> Any:
        response = real(**kwargs)
        if kwargs["Key"].endswith(".safetensors") and cuts[0] < times:
            cuts[0] += 1
            response["Body"] = CutStream(response["Body"], 1000, fail=fail)
        return response

    client.get_object = get_object
    return client


def test_a_stream_cut_mid_body_is_read_again_into_the_same_place(
    s3: Any, demo_model_dir: Path, tmp_path: Path
) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    fetcher = MemoryFetcher(tmp_path / "cache", cutting(s3, times=2, fail=True), part_size=256 * 1024)

    fetcher.fetch(f"s3://{BUCKET}/m/")  # verified against the manifest, so every byte is right

    original = load_file(demo_model_dir / "model.safetensors")
    state = fetcher.weights.state_dict(lambda name, stored: None)
    assert all(torch.equal(state[name], original[name]) for name in original)


def test_a_body_shorter_than_its_range_is_refused(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    fetcher = MemoryFetcher(tmp_path / "cache", cutting(s3, times=1, fail=False))

    with pytest.raises(
        ModelLoadError, match=r"model\.safetensors: S3 returned 1000 bytes where \d+ were expected"
    ):
        fetcher.fetch(f"s3://{BUCKET}/m/")
