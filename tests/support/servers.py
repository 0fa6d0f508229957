"""Real server processes for the integration tests: started the README's way, waited for, stopped."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from tests.support.local_aws import stop_process

REPO = Path(__file__).resolve().parents[2]


def wait_healthy(base_url: str, process: subprocess.Popen[bytes], timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}")
        try:
            response = requests.get(f"{base_url}/health", timeout=2)
            if response.status_code == 200:
                body: dict[str, Any] = response.json()
                return body
        except requests.ConnectionError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become healthy")


def start(command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    environment = {
        key: value
        for key, value in os.environ.items()
        if key not in ("MODEL_PATH", "LOAD_IN_8BIT", "LOAD_IN_4BIT")
    }
    environment.update(env or {})
    return subprocess.Popen(
        command,
        cwd=REPO,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop(process: subprocess.Popen[bytes]) -> None:
    stop_process(process, timeout=20)


def serve_command(model_dir: Path, port: int, *flags: str) -> list[str]:
    """`python -m function serve --model_path DIR --host 127.0.0.1 --port PORT [flags]` (the README)."""
    return [
        sys.executable,
        "-m",
        "function",
        "serve",
        "--model_path",
        str(model_dir),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        *flags,
    ]


@contextmanager
def served(model_dir: Path, *flags: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """A `python -m function serve` process on a free port, healthy; its base URL. Stopped after."""
    from tests.support.ports import free_port

    port = free_port()
    process = start(serve_command(model_dir, port, *flags), env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url
    finally:
        stop(process)
