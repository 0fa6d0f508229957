"""Two processes fetch one S3 prefix into one cache at once (the Lambda prefetch beside a retry, two
workers of one server): both succeed, with the same complete directory, which stays.

Real processes (`python -m function.weights.prefetch`, the Lambda entry's prefetch) against a real
S3 server (SeaweedFS on 127.0.0.1).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.local_aws import SeaweedFS
from tests.support.s3 import files_of, upload_model

pytestmark = pytest.mark.emulator
BUCKET = "models"
MODEL_URI = f"s3://{BUCKET}/demo/padded_model/"
PADDING_BYTES = 32 * 1024 * 1024  # enough that the two downloads overlap, however the processes start
ROUNDS = 3


@pytest.fixture(scope="module")
def padded_model(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Path:
    model_dir = tmp_path_factory.mktemp("padded") / "padded_model"
    shutil.copytree(demo_model_dir, model_dir)
    (model_dir / "padding.dat").write_bytes(os.urandom(PADDING_BYTES))
    return model_dir


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory, padded_model: Path) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    upload_model(client, BUCKET, "demo/padded_model/", padded_model)
    yield server
    server.stop()


def start_prefetch(seaweed: SeaweedFS, cache: Path) -> subprocess.Popen[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("AWS_")}
    env.update(seaweed.environment())
    return subprocess.Popen(
        [sys.executable, "-m", "function.weights.prefetch", MODEL_URI, str(cache)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("round_", range(ROUNDS))
def test_two_processes_fetching_one_prefix_both_get_the_complete_directory(
    seaweed: SeaweedFS, padded_model: Path, tmp_path: Path, round_: int
) -> None:
    # GIVEN an empty cache
    cache = tmp_path / "cache"

    # WHEN two processes fetch the same prefix into it at once
    processes = [start_prefetch(seaweed, cache) for _ in range(2)]
    outputs = [process.communicate(timeout=120) for process in processes]

    # THEN both succeed and report the same directory: one downloaded it, the other waited and reused it
    assert [process.returncode for process in processes] == [0, 0], [err for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert results[0]["local_dir"] == results[1]["local_dir"]
    assert sorted(result["from_cache"] for result in results) == [False, True]
    # AND the directory exists, complete, with every file whole
    local_dir = Path(results[0]["local_dir"])
    assert (local_dir / ".complete").is_file()
    assert files_of(padded_model).items() <= files_of(local_dir).items()
    assert not list(cache.rglob("*.part"))
