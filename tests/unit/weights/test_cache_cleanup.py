"""The fetcher's cleanup of leftovers against a concurrent fetch of another model that completes
while the cleanup looks at it (seen once in a full test run: the adapter's fetch removed its base's
freshly completed directory, and the base then failed to load)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from function.weights import fetcher
from function.weights.fetcher import COMPLETE_MARKER, ModelFetcher, cache_lock


def test_a_directory_completed_between_the_look_and_the_lock_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    base = cache / "aaaaaaaaaaaa-base"  # another model's fetch, still writing
    (base / "model.safetensors").parent.mkdir(parents=True)
    (base / "model.safetensors").write_bytes(b"weights")
    keep = cache / "bbbbbbbbbbbb-adapter"
    real_lock = cache_lock

    @contextmanager
    def lock_after_the_base_completes(target: Path, *, wait: bool = True) -> Iterator[bool]:
        if target == base:  # the base's fetch finishes just before the cleanup takes its lock
            (base / COMPLETE_MARKER).write_text("{}", encoding="utf-8")
        with real_lock(target, wait=wait) as taken:
            yield taken

    monkeypatch.setattr(fetcher, "cache_lock", lock_after_the_base_completes)

    ModelFetcher(cache, client=object())._remove_leftovers(keep=keep)

    assert (base / "model.safetensors").read_bytes() == b"weights"


def test_an_incomplete_directory_nobody_writes_is_removed(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    stale = cache / "aaaaaaaaaaaa-stale"
    stale.mkdir(parents=True)
    (stale / "model.safetensors.part").write_bytes(b"half")

    ModelFetcher(cache, client=object())._remove_leftovers(keep=cache / "bbbbbbbbbbbb-new")

    assert not stale.exists()
