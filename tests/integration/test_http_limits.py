"""The server's own header limit (`python -m function serve`): a request head that grows past it, finished
or not, is answered 431 and its connection closed before anything reaches the app."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from tests.support.ports import free_port
from tests.support.servers import serve_command, start, stop, wait_healthy

pytestmark = pytest.mark.server
LIMIT = 16_384  # MAX_HEADER_BYTES' default


@pytest.fixture(scope="module")
def served(demo_model_dir: Path) -> Iterator[tuple[tuple[str, int], int]]:
    """`python -m function serve` (uvicorn in that process): its address and process id."""
    port = free_port()
    process = start(serve_command(demo_model_dir, port))
    try:
        wait_healthy(f"http://127.0.0.1:{port}", process)
        yield ("127.0.0.1", port), process.pid
    finally:
        stop(process)


@pytest.fixture
def server(served: tuple[tuple[str, int], int]) -> tuple[str, int]:
    return served[0]


@pytest.fixture
def server_pid(served: tuple[tuple[str, int], int]) -> int:
    return served[1]


def exchange(address: tuple[str, int], data: bytes, timeout: float = 10) -> tuple[bytes, bool]:
    """Send `data` on a new connection and read until the server closes it (or `timeout` passes):
    what came back, and whether the server closed the connection."""
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        received, deadline = b"", time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:  # closed with our unread bytes in its buffer: a reset, not a FIN
                return received, True
            except TimeoutError:
                return received, False
            if not chunk:
                return received, True
            received += chunk
        return received, False


def response_parts(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body


@pytest.mark.parametrize("path", ["/health", "/v1/models"])
def test_a_header_block_that_never_ends_is_refused_and_closed(server: tuple[str, int], path: str) -> None:
    # GIVEN a client that sends headers past the limit and never finishes the head (no blank line)
    head = f"GET {path} HTTP/1.1\r\nHost: x\r\nX-Pad: ".encode() + b"p" * (4 * LIMIT)

    # WHEN it waits for an answer
    raw, closed = exchange(server, head)

    # THEN the server answered 431, in the route family's shape, and closed the connection
    assert raw, "no answer: the server is still buffering the head"
    status, headers, body = response_parts(raw)
    assert status == 431 and closed
    assert headers["connection"] == "close"
    error = json.loads(body)["error"]
    assert error["code"] == "headers_too_large" and str(LIMIT) in error["message"]
    assert ("param" in error) == path.startswith("/v1/")


def test_a_header_just_under_the_limit_is_served(server: tuple[str, int]) -> None:
    host, port = server
    url = f"http://{host}:{port}/health"

    assert requests.get(url, headers={"X-Pad": "p" * (LIMIT - 200)}, timeout=30).status_code == 200
    over = requests.get(url, headers={"X-Pad": "p" * (LIMIT + 1)}, timeout=30)
    assert over.status_code == 431 and over.json()["error"]["code"] == "headers_too_large"


def resident_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_unfinished_huge_headers_hold_no_memory(server: tuple[str, int], server_pid: int) -> None:
    # GIVEN the server's memory now
    before = resident_mb(server_pid)

    # WHEN eight clients each send an 8 MiB header and never finish their heads (the probe)
    sockets = [socket.create_connection(server, timeout=10) for _ in range(8)]
    try:
        for sock in sockets:
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused mid-send
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * (8 * 2**20))
        time.sleep(0.5)  # let the server take in whatever it would
        grown = resident_mb(server_pid) - before
    finally:
        for sock in sockets:
            sock.close()

    # THEN it held none of it (without the limit it buffered all 64 MiB, and more), and still serves
    assert grown < 16, f"the server grew by {grown:.0f} MB"
    assert requests.get(f"http://{server[0]}:{server[1]}/health", timeout=30).status_code == 200
