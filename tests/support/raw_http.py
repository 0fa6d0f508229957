"""Raw HTTP/1.1 over a socket, for clients that hang up mid-request; and reading /metrics."""

from __future__ import annotations

import json
import socket
from typing import Any

import requests

MAX_READ_BYTES = 1 << 20


def open_request(port: int, path: str, body: dict[str, Any], timeout: float = 60) -> socket.socket:
    """POST JSON to 127.0.0.1:port; return the open socket, nothing read yet (close it to hang up)."""
    payload = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    )
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.sendall(head.encode() + payload)
    return sock


def read_until(sock: socket.socket, marker: bytes) -> bytes:
    """What the socket sends up to and including `marker` (or until it closes, or 1 MiB); each read waits
    at most the socket's timeout."""
    received = b""
    while marker not in received and len(received) < MAX_READ_BYTES:
        chunk = sock.recv(4096)
        if not chunk:
            break
        received += chunk
    return received


def metric(base_url: str, name: str, **labels: str) -> float:
    """A sample's value on the server's /metrics (0 when it has none yet)."""
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(f"{base_url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return float(sample.value)
    return 0.0
