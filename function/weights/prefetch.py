"""The Lambda entry's prefetch: the S3 fetch in a child process, started before torch is imported.

`python -m function.weights.prefetch s3://bucket/prefix CACHE_DIR` fetches and prints the result
as JSON; `fetch_model` later takes that result, or fetches in process when no prefetch ran.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from function.errors import ModelLoadError
from function.weights.fetcher import FetchResult, ModelFetcher

_prefetches: dict[tuple[str, Path], subprocess.Popen[str]] = {}
_prefetch_lock = threading.Lock()


def prefetch(uri: str, cache_root: Path) -> None:
    """Start fetching `uri` in a child process (own interpreter, own core), to overlap the imports.

    The Lambda entry calls this before importing torch; `fetch_model` later takes the result.
    """
    with _prefetch_lock:
        if (uri, cache_root) not in _prefetches:
            _prefetches[(uri, cache_root)] = subprocess.Popen(
                [sys.executable, "-m", "function.weights.prefetch", uri, str(cache_root)],
                stdout=subprocess.PIPE,
                text=True,
            )


def fetch_model(uri: str, cache_root: Path) -> FetchResult:
    """The prefetch's result when one was started (once: a retry fetches anew), else a fetch now.

    A failed prefetch is not trusted for its reason: the fetch runs again here, and raises it.
    """
    with _prefetch_lock:
        child = _prefetches.pop((uri, cache_root), None)
    if child is not None:
        output, _ = child.communicate()
        if child.returncode == 0:
            fields = json.loads(output.strip().splitlines()[-1])
            return FetchResult(**{**fields, "local_dir": Path(fields["local_dir"])})
    return ModelFetcher(cache_root).fetch(uri)


def main(argv: list[str]) -> int:
    """`python -m function.weights.prefetch s3://bucket/prefix CACHE_DIR`: fetch, print the result as JSON."""
    if len(argv) != 2:
        print("usage: python -m function.weights.prefetch s3://bucket/prefix CACHE_DIR", file=sys.stderr)
        return 2
    try:
        result = ModelFetcher(Path(argv[1])).fetch(argv[0])
    except ModelLoadError as exc:
        print(exc.message, file=sys.stderr)
        return 1
    print(json.dumps({**asdict(result), "local_dir": str(result.local_dir)}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
