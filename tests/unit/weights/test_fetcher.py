"""The S3 fetcher against moto: round trips, cache, integrity and faults."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto import mock_aws
from moto.server import ThreadedMotoServer

from function.errors import ModelLoadError
from function.weights.fetcher import COMPLETE_MARKER, ModelFetcher
from function.weights.integrity import MANIFEST_NAME
from function.weights.s3 import parse_s3_uri, s3_client
from tests.support.fetchers import FillingDisk, FixedFreeSpace
from tests.support.ports import free_port
from tests.support.s3 import RequestCounter, files_of, inject_errors, upload_model

BUCKET = "models"


@pytest.fixture
def s3(aws_credentials: None) -> Iterator[Any]:
    with mock_aws():
        client = s3_client()  # the production client: its retry configuration is under test
        client.create_bucket(Bucket=BUCKET)
        yield client


def leftovers(cache: Path) -> list[str]:
    if not cache.exists():
        return []
    # .locks/ holds the empty lock files of cache directories: no data, kept on purpose
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if ".locks" not in p.parts)


def test_round_trip_with_manifest_and_ranged_parts(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    # GIVEN a published model and a part size small enough to split the weights
    upload_model(s3, BUCKET, "m/final_model/", demo_model_dir)
    counter = RequestCounter(s3)
    fetcher = ModelFetcher(tmp_path / "cache", s3, part_size=256 * 1024)

    # WHEN it is fetched
    result = fetcher.fetch(f"s3://{BUCKET}/m/final_model")

    # THEN every file arrives intact, the weights in several ranged GETs, and nothing is left partial
    expected = files_of(demo_model_dir)
    fetched = files_of(result.local_dir)
    assert {k: v for k, v in fetched.items() if k != MANIFEST_NAME} == expected
    weights = (demo_model_dir / "model.safetensors").stat().st_size
    assert counter.ranged >= weights // (256 * 1024)
    assert not result.from_cache and result.bytes_downloaded == result.bytes_total > weights
    assert not list(result.local_dir.rglob("*.part"))


def test_unchanged_weights_are_not_downloaded_again(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    upload_model(s3, BUCKET, "m/final_model/", demo_model_dir)
    first = ModelFetcher(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/m/final_model/")
    counter = RequestCounter(s3)

    # WHEN a new process (a reset that kept /tmp) fetches the same prefix
    again = ModelFetcher(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/m/final_model/")

    # THEN it lists, but downloads nothing
    assert again.from_cache and again.local_dir == first.local_dir and again.bytes_downloaded == 0
    assert counter.calls["GetObject"] == 0 and counter.calls["ListObjectsV2"] == 1

    # AND a changed object is a new version: downloaded, and the old copy removed
    s3.put_object(
        Bucket=BUCKET,
        Key="m/final_model/config.json",
        Body=(demo_model_dir / "config.json").read_bytes() + b"\n",
    )
    s3.put_object(Bucket=BUCKET, Key=f"m/final_model/{MANIFEST_NAME}", Body=b'{"files": {}}')
    changed = ModelFetcher(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/m/final_model/")
    assert not changed.from_cache and changed.local_dir != first.local_dir
    assert not first.local_dir.exists()


def test_tampered_file_is_refused_and_nothing_partial_is_left(
    s3: Any, demo_model_dir: Path, tmp_path: Path
) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    tampered = bytearray((demo_model_dir / "model.safetensors").read_bytes())
    tampered[-1] ^= 0xFF
    s3.put_object(Bucket=BUCKET, Key="m/model.safetensors", Body=bytes(tampered))

    with pytest.raises(ModelLoadError, match="SHA-256 differs from the manifest"):
        ModelFetcher(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/m/")

    assert leftovers(tmp_path / "cache") == []


def test_truncated_object_is_refused(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    data = (demo_model_dir / "model.safetensors").read_bytes()
    s3.put_object(Bucket=BUCKET, Key="m/model.safetensors", Body=data[: len(data) // 2])

    with pytest.raises(ModelLoadError, match="truncated"):
        ModelFetcher(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/m/")
    assert leftovers(tmp_path / "cache") == []


def test_file_listed_in_manifest_but_missing(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    s3.delete_object(Bucket=BUCKET, Key="m/tokenizer.json")

    with pytest.raises(ModelLoadError, match=r"missing from S3: tokenizer\.json"):
        ModelFetcher(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/m/")


def test_without_manifest_s3_checksums_are_verified(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir, manifest=False, checksum="CRC32")
    counter = RequestCounter(s3)

    result = ModelFetcher(tmp_path / "ok", s3).fetch(f"s3://{BUCKET}/m/")
    assert files_of(result.local_dir) == files_of(demo_model_dir)
    assert counter.calls["HeadObject"] == len(files_of(demo_model_dir))

    # WHEN S3 reports a checksum the bytes don't have (a corrupt transfer)
    def corrupt(parsed: dict[str, Any], **_: Any) -> None:
        parsed["ChecksumCRC32"] = "AAAAAA=="

    s3.meta.events.register("after-call.s3.HeadObject", corrupt)
    with pytest.raises(ModelLoadError, match="CRC32 checksum mismatch"):
        ModelFetcher(tmp_path / "bad", s3).fetch(f"s3://{BUCKET}/m/")
    assert leftovers(tmp_path / "bad") == []


def test_503_then_success_is_retried(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    sent = inject_errors(s3, "GetObject", 503, "SlowDown", times=3)

    result = ModelFetcher(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/m/")

    assert len(sent) > 3  # the failures were sent and retried
    assert files_of(result.local_dir).keys() >= files_of(demo_model_dir).keys()


@pytest.mark.parametrize(
    ("code", "status", "reason"),
    [
        ("AccessDenied", 403, "denied (AccessDenied)"),
        ("NoSuchBucket", 404, "does not exist (NoSuchBucket)"),
    ],
)
def test_clear_reasons_for_access_and_bucket_errors(
    s3: Any, tmp_path: Path, code: str, status: int, reason: str
) -> None:
    inject_errors(s3, "ListObjectsV2", status, code, times=100)

    with pytest.raises(ModelLoadError) as error:
        ModelFetcher(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/private/prefix/")

    assert reason in error.value.message
    assert BUCKET not in error.value.message and "private/prefix" not in error.value.message


def test_missing_bucket_and_empty_prefix(s3: Any, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="NoSuchBucket"):
        ModelFetcher(tmp_path / "cache", s3).fetch("s3://no-such-bucket/m/")
    with pytest.raises(ModelLoadError, match="no model files"):
        ModelFetcher(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/empty/")


def test_pickle_files_are_never_fetched(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir, manifest=False)
    s3.put_object(Bucket=BUCKET, Key="m/training_args.bin", Body=b"pickle")
    s3.put_object(Bucket=BUCKET, Key="p/config.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key="p/pytorch_model.bin", Body=b"pickle")

    result = ModelFetcher(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/m/")
    assert not (result.local_dir / "training_args.bin").exists()
    with pytest.raises(ModelLoadError, match="pickle checkpoints are refused"):
        ModelFetcher(tmp_path / "cache", s3).fetch(f"s3://{BUCKET}/p/")


def test_too_small_cache_fails_before_downloading(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    counter = RequestCounter(s3)
    cache = tmp_path / "cache"
    cache.mkdir()
    free = shutil.disk_usage(cache).free

    with pytest.raises(
        ModelLoadError, match=r"no space left in the model cache directory \(MODEL_CACHE_DIR\)"
    ):
        ModelFetcher(cache, s3, reserve_bytes=free).fetch(f"s3://{BUCKET}/m/")

    assert counter.calls["GetObject"] == 0
    assert leftovers(cache) == []


@pytest.mark.parametrize(
    "uri",
    [
        "s3://models/../etc/",
        "s3://models/a/../../b",
        "s3://Bad_Bucket/x",
        "s3://models//double",
        "s3:///nobucket",
    ],
)
def test_unsafe_uris_are_refused(uri: str) -> None:
    with pytest.raises(ModelLoadError):
        parse_s3_uri(uri)


def test_prefix_normalisation() -> None:
    assert parse_s3_uri("s3://models/a/b").prefix == "a/b/"
    assert parse_s3_uri("s3://models/a/b/").prefix == "a/b/"
    assert parse_s3_uri("s3://models").prefix == ""


KILLABLE_FETCH = """
import sys, time
from pathlib import Path
from function.weights.fetcher import ModelFetcher
from function.weights.s3 import s3_client
client = s3_client()
client.meta.events.register("after-call.s3.GetObject", lambda **_: time.sleep(0.5))
ModelFetcher(Path(sys.argv[1]), client, part_size=64 * 1024, max_workers=2).fetch(sys.argv[2])
"""


def test_a_download_killed_midway_is_never_used(
    aws_credentials: None, demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        endpoint = f"http://127.0.0.1:{server._server.server_port}"  # type: ignore[union-attr]
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
        client = boto3.client("s3")
        client.create_bucket(Bucket=BUCKET)
        upload_model(client, BUCKET, "m/", demo_model_dir)
        cache = tmp_path / "cache"

        # GIVEN a fetch in another process, killed once it has written part of the weights
        process = subprocess.Popen(
            [sys.executable, "-c", KILLABLE_FETCH, str(cache), f"s3://{BUCKET}/m/"], env={**os.environ}
        )
        deadline = time.monotonic() + 60
        while not list(cache.rglob("*.part")) and time.monotonic() < deadline:
            time.sleep(0.05)
        process.kill()
        process.wait()
        assert list(cache.rglob("*.part")), "the fetch should have been killed mid-way"
        assert not list(cache.rglob(COMPLETE_MARKER))

        # WHEN the next process fetches again
        result = ModelFetcher(cache, client).fetch(f"s3://{BUCKET}/m/")

        # THEN it fetches what was missing, and only complete, verified files exist
        assert not result.from_cache and 0 < result.bytes_downloaded <= result.bytes_total
        assert {k: v for k, v in files_of(result.local_dir).items() if k != MANIFEST_NAME} == files_of(
            demo_model_dir
        )
        assert not list(cache.rglob("*.part"))
        assert (
            json.loads((result.local_dir / COMPLETE_MARKER).read_text())["files"]
            == len(files_of(demo_model_dir)) + 1
        )
    finally:
        server.stop()


def test_an_interrupted_fetch_resumes_with_the_verified_files(
    s3: Any, demo_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN a fetch that was cut short: no marker, one file missing, a stray part
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    cache = tmp_path / "cache"
    first = ModelFetcher(cache, s3).fetch(f"s3://{BUCKET}/m/")
    (first.local_dir / COMPLETE_MARKER).unlink()
    (first.local_dir / "tokenizer.json").unlink()
    (first.local_dir / "model.safetensors.part").write_bytes(b"half")
    counter = RequestCounter(s3)

    # WHEN it runs again
    again = ModelFetcher(cache, s3).fetch(f"s3://{BUCKET}/m/")

    # THEN only the missing file (and the manifest, to verify it) is downloaded, and the marker is back
    assert counter.calls["GetObject"] == 2
    assert again.bytes_downloaded == (demo_model_dir / "tokenizer.json").stat().st_size
    assert (again.local_dir / COMPLETE_MARKER).is_file()
    assert not list(cache.rglob("*.part"))
    assert files_of(again.local_dir)["tokenizer.json"] == (demo_model_dir / "tokenizer.json").read_bytes()


def test_an_unreachable_s3_gives_a_clear_reason(
    aws_credentials: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN an S3 endpoint where nothing listens (boto3 retries the connection, then gives up)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")

    with pytest.raises(ModelLoadError) as error:
        ModelFetcher(tmp_path / "cache").fetch("s3://models/m/")

    assert "could not be reached" in error.value.message
    assert leftovers(tmp_path / "cache") == []


def test_another_models_complete_cache_is_kept(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    # GIVEN model A cached, and a partial download of some other model left behind
    upload_model(s3, BUCKET, "a/", demo_model_dir)
    upload_model(s3, BUCKET, "b/", demo_model_dir)
    cache = tmp_path / "cache"
    first = ModelFetcher(cache, s3).fetch(f"s3://{BUCKET}/a/")
    (cache / "0123456789ab-partial").mkdir()

    # WHEN model B is fetched
    second = ModelFetcher(cache, s3).fetch(f"s3://{BUCKET}/b/")

    # THEN A's verified cache stays (a reload of A downloads nothing) and the partial one is gone
    assert (first.local_dir / COMPLETE_MARKER).is_file() and second.local_dir != first.local_dir
    assert not (cache / "0123456789ab-partial").exists()
    assert ModelFetcher(cache, s3).fetch(f"s3://{BUCKET}/a/").from_cache


def test_concurrent_fetches_into_one_cache_keep_each_others_work(
    s3: Any, demo_model_dir: Path, other_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN two published models (an adapter and its base, say) fetched at once into one cache,
    # each of them twice
    upload_model(s3, BUCKET, "a/", demo_model_dir)
    upload_model(s3, BUCKET, "b/", other_model_dir)
    uris = [f"s3://{BUCKET}/a/", f"s3://{BUCKET}/b/"] * 2

    # WHEN they run concurrently, in small parts so that they overlap
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=len(uris)) as pool:
        results = list(
            pool.map(lambda uri: ModelFetcher(tmp_path / "cache", s3, part_size=64 * 1024).fetch(uri), uris)
        )

    # THEN no fetch removed another's directory: every one ends complete and whole
    for result, source in zip(results, [demo_model_dir, other_model_dir] * 2, strict=True):
        assert (result.local_dir / ".complete").is_file()
        assert files_of(source).items() <= files_of(result.local_dir).items()
    assert sum(not result.from_cache for result in results) == 2  # the second of each waited, then reused


def listed_sizes(client: Any, prefix: str) -> list[int]:
    return [item["Size"] for item in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]


def test_a_disk_that_fills_up_mid_download_says_so(s3: Any, demo_model_dir: Path, tmp_path: Path) -> None:
    # GIVEN a cache whose disk fills up after 256 KiB, though it looked big enough when the fetch began
    upload_model(s3, BUCKET, "m/", demo_model_dir)
    asked: list[tuple[str, str]] = []
    s3.meta.events.register(
        "before-parameter-build.s3.GetObject",
        lambda params, **_: asked.append((params["Key"], params.get("Range", ""))),
    )
    fetcher = FillingDisk(tmp_path / "cache", s3, part_size=64 * 1024, capacity=256 * 1024)

    # WHEN the model is fetched
    with pytest.raises(ModelLoadError) as error:
        fetcher.fetch(f"s3://{BUCKET}/m/")

    # THEN the reason is the full disk and what the model needs (not an unreachable S3)
    sizes = listed_sizes(s3, "m/")
    assert error.value.message == (
        "no space left in the model cache directory (MODEL_CACHE_DIR): it needs "
        f"{math.ceil(sum(sizes) / 1e6)} MB; raise the function's ephemeral storage"
    )
    # AND a write refused for space is not retried: no range is asked for twice
    assert fetcher.writes_refused > 0
    assert len(asked) == len(set(asked))
    assert leftovers(tmp_path / "cache") == []


def test_concurrent_fetches_reserve_the_space_they_will_write(
    s3: Any, demo_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN two models, and a disk with room for one of them (its free space doesn't drop while the
    # first download's sparse files wait to be filled)
    upload_model(s3, BUCKET, "a/", demo_model_dir)
    upload_model(s3, BUCKET, "b/", demo_model_dir)
    free = sum(listed_sizes(s3, "a/")) * 3 // 2
    cache = tmp_path / "cache"
    started, release = threading.Event(), threading.Event()

    def hold_model_a(params: dict[str, Any], **_: Any) -> None:
        if params["Key"].startswith("a/"):
            started.set()
            release.wait(timeout=30)

    s3.meta.events.register("before-parameter-build.s3.GetObject", hold_model_a)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        # WHEN the second fetch starts while the first has its space reserved but not yet written
        first = pool.submit(FixedFreeSpace(cache, s3, free=free).fetch, f"s3://{BUCKET}/a/")
        assert started.wait(timeout=30)
        try:
            # THEN the second is refused, naming the space the first still needs
            with pytest.raises(ModelLoadError) as error:
                FixedFreeSpace(cache, s3, free=free).fetch(f"s3://{BUCKET}/b/")
        finally:
            release.set()
        # AND the first completes
        result = first.result(timeout=60)
    assert error.value.message.startswith("no space left in the model cache directory (MODEL_CACHE_DIR)")
    assert "that downloads in progress have yet to write" in error.value.message
    assert (result.local_dir / COMPLETE_MARKER).is_file()

    # AND once the first is done its reservation is gone: the second fits now
    assert not FixedFreeSpace(cache, s3, free=free).fetch(f"s3://{BUCKET}/b/").from_cache
