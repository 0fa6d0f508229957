"""A free TCP port on the loopback interface, for a server a test starts."""

from __future__ import annotations

import random
import socket
from pathlib import Path

RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
SPAN = 10_000  # ports below the ephemeral range to pick from


def free_port() -> int:
    """A port nothing listens on now, below the kernel's ephemeral range: a server binds it only
    later, and in between every outgoing connection takes an ephemeral port from the OS; one chosen
    by the OS (bind to port 0) is in that range, and runs lost SeaweedFS's and the Lambda
    emulator's ports that way ("address already in use")."""
    low = _ephemeral_low()
    for _ in range(200):
        port = random.randrange(max(1024, low - SPAN), low)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as sock:  # everything below taken: the OS's choice
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ephemeral_low() -> int:
    try:
        return int(RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default
