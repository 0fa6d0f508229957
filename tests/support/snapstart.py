"""SnapStart on this machine: a snapshot stood in for by a fork, restored environments by the real emulator.

The Runtime Interface Emulator answers `/restore/next` with 404: it cannot snapshot. So:

- the **holder** (`python -m tests.support.snapstart hold SOCKET`) runs the real awslambdaric bootstrap
  over `function.handler.handler` with `AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`: the INIT (imports,
  fetch, load, warm-up), then awslambdaric's own before-snapshot hook run, then `restore_next()`, the
  moment Lambda takes the snapshot. Here that call listens on a Unix socket and never returns in the
  holder: each connection forks the process as it stands, and `restore_next()` returns in the child, so
  awslambdaric runs the after-restore hooks there and enters its invoke loop;
- each **restored environment** is a real emulator whose runtime is `python -m tests.support.snapstart
  restore SOCKET`: it hands the holder its Runtime API address and its stdout/stderr, and lives as
  long as the forked child serves that emulator.

What a fork cannot show: the restore's own cost (Lambda pages the snapshot in from its cache; AWS
documents it), and anything that differs between machines. Threads don't survive a fork (they do a
real restore): torch's intra-op pool is rebuilt on demand in the child, but torch inductor's compile
pool is not (a TORCH_COMPILE child would hang on its first compile; the function ignores
TORCH_COMPILE on Lambda, and benchmarks set TORCHINDUCTOR_COMPILE_THREADS=1).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.local_aws import REPO, LambdaEmulator, stop_process

HANDLER = "function.handler.handler"
STDIO = 2  # stdout and stderr travel with the request


def _log(message: str) -> None:
    print(f"[snapstart-emulation {os.getpid()}] {message}", file=sys.stderr, flush=True)


def hold(socket_path: str) -> None:
    """The snapshot holder: awslambdaric's bootstrap, with the snapshot point emulated by fork."""
    from awslambdaric import bootstrap
    from awslambdaric.lambda_runtime_client import LambdaRuntimeClient

    class ForkingRuntimeClient(LambdaRuntimeClient):  # type: ignore[misc]  # untyped package
        def post_init_error(self, error_response_data: Any, error_type_override: Any = None) -> None:
            _log(f"INIT failed: {json.dumps(error_response_data)[:2000]}")  # no Runtime API in the holder
            os._exit(1)

        def restore_next(self) -> None:
            address = serve_restores(socket_path)  # returns in a forked child only
            self.lambda_runtime_address = address

    os.environ.pop("AWS_LAMBDA_RUNTIME_API", None)
    bootstrap.run(HANDLER, ForkingRuntimeClient("unused:0"))


def established_tcp() -> list[str]:
    """This process's established TCP connections, as `host:port` of the peer (from /proc)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    peers = []
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        try:
            lines = Path(table).read_text(encoding="ascii").splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "01" and fields[9] in inodes:  # 01: ESTABLISHED
                address, port = fields[2].split(":")
                host = ".".join(str(b) for b in reversed(bytes.fromhex(address[-8:])))
                peers.append(f"{host}:{int(port, 16)}")
    return sorted(peers)


def snapshot_report() -> dict[str, Any]:
    """What the snapshot would hold, as the tests check it: the hooks, the open connections, the threads."""
    import snapshot_restore_py

    def names(registry: list[Any]) -> list[str]:
        return [getattr(entry[0], "__qualname__", repr(entry[0])) for entry in registry]

    after = snapshot_restore_py.get_after_restore()
    return {
        "pid": os.getpid(),
        # awslambdaric pops the before-snapshot hooks as it runs them: what ran shows in the hooks' own log
        "before_snapshot_hooks_left": names(snapshot_restore_py.get_before_snapshot()),
        "after_restore_hooks": names(after),
        "hooks_ran": [list(getattr(getattr(entry[0], "__self__", None), "log", [])) for entry in after],
        "established_tcp": established_tcp(),
        "threads": sorted(thread.name for thread in threading.enumerate()),
    }


def serve_restores(socket_path: str) -> str:
    """Listen; fork a child per connection. Returns, in the child, the Runtime API it now serves."""
    Path(socket_path + ".json").write_text(json.dumps(snapshot_report()), encoding="utf-8")
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the system
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(socket_path + ".tmp")
    listener.listen(16)
    os.rename(socket_path + ".tmp", socket_path)  # the socket appears once the snapshot point is reached
    _log("snapshot point reached: restores are served on " + socket_path)
    while True:
        connection, _ = listener.accept()
        message, fds, _, _ = socket.recv_fds(connection, 4096, STDIO)
        request = json.loads(message)
        pid = os.fork()
        if pid == 0:  # the restored environment
            listener.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            for target, fd in zip((1, 2), fds, strict=True):
                os.dup2(fd, target)
                os.close(fd)
            os.environ["AWS_LAMBDA_RUNTIME_API"] = request["runtime_api"]
            _reinitialize_runtime_client(request["runtime_api"])
            _exit_with(connection)
            _log("restored from the snapshot")
            return str(request["runtime_api"])
        for fd in fds:
            os.close(fd)
        connection.sendall(json.dumps({"pid": pid}).encode() + b"\n")
        connection.close()


class RuntimeTransport:
    """The Runtime API calls awslambdaric's native `runtime_client` makes, in Python. The native client is
    initialized once per process, for the address the holder never had: a forked child swaps in this one
    (the same requests, over http.client) and keeps awslambdaric's own invoke loop."""

    def __init__(self, address: str) -> None:
        self.address = address

    def _call(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
        import http.client

        connection = http.client.HTTPConnection(self.address, timeout=None)
        connection.request(method, "/2018-06-01/runtime" + path, body=body, headers=headers or {})
        response = connection.getresponse()
        data = response.read()
        connection.close()
        if response.status >= 300:
            raise RuntimeError(f"Runtime API {method} {path}: {response.status} {data[:200]!r}")
        return data, dict(response.getheaders())

    def next(self) -> tuple[bytes, dict[str, Any]]:
        body, headers = self._call("GET", "/invocation/next")
        deadline = headers.get("Lambda-Runtime-Deadline-Ms")
        if deadline is not None:  # the native client hands it over as a number
            headers["Lambda-Runtime-Deadline-Ms"] = int(deadline)
        return body, headers

    def post_invocation_result(
        self, invoke_id: str, data: bytes, content_type: str, invocation_id: str | None = None
    ) -> None:
        self._call("POST", f"/invocation/{invoke_id}/response", data, {"Content-Type": content_type})

    def post_error(
        self, invoke_id: str, error_response_data: str, xray_fault: str, invocation_id: str | None = None
    ) -> None:
        error_type = json.loads(error_response_data).get("errorType", "Runtime.Unknown")
        headers = {"Lambda-Runtime-Function-Error-Type": error_type, "Content-Type": "application/json"}
        if xray_fault:
            headers["Lambda-Runtime-Function-XRay-Error-Cause"] = xray_fault
        self._call("POST", f"/invocation/{invoke_id}/error", error_response_data.encode(), headers)


def _reinitialize_runtime_client(address: str) -> None:
    from awslambdaric import lambda_runtime_client

    lambda_runtime_client.runtime_client = RuntimeTransport(address)


def _exit_with(connection: socket.socket) -> None:
    """The restored child ends when its emulator's runtime process (the `restore` shim) ends."""

    def watch() -> None:
        try:
            while connection.recv(1):
                pass
        finally:
            os._exit(0)

    threading.Thread(target=watch, name="restore-shim-watch", daemon=True).start()


def restore(socket_path: str) -> int:
    """The runtime an emulator starts: ask the holder for a restored environment, live as long as it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as connection:
        connection.connect(socket_path)
        request = json.dumps({"runtime_api": os.environ["AWS_LAMBDA_RUNTIME_API"]}).encode()
        socket.send_fds(connection, [request], [1, 2])
        reply = connection.makefile("rb").readline()
        child = json.loads(reply)["pid"] if reply else None
        print(f"[snapstart-emulation] restored environment: pid {child}", file=sys.stderr, flush=True)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # closing the socket ends the child
        if child is None:  # the holder gave no environment
            return 1
        while True:
            try:
                os.kill(int(child), 0)
            except ProcessLookupError:
                return 1
            time.sleep(0.2)


class SnapStartEmulation:
    """A holder process (the INIT, up to the snapshot) and restored environments forked from it."""

    def __init__(self, environment: dict[str, str], root: Path, *, memory_mb: int = 3008) -> None:
        self.environment = {**environment, "AWS_LAMBDA_INITIALIZATION_TYPE": "snap-start"}
        self.root = root
        self.memory_mb = memory_mb
        self.socket_path = str(root / "snapshot.sock")
        self.log_path = root / "holder.log"
        self.holder: subprocess.Popen[bytes] | None = None
        self.restored: list[LambdaEmulator] = []
        self.init_seconds: float | None = None

    def start(self, timeout: float = 600) -> SnapStartEmulation:
        """Run the INIT and the before-snapshot hooks; returns at the snapshot point."""
        env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "MODEL_"))}
        env.update(
            {
                "AWS_LAMBDA_FUNCTION_TIMEOUT": "60",
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
                "AWS_LAMBDA_FUNCTION_NAME": "llm-function",
                "PYTHONPATH": str(REPO),
                "LOG_LEVEL": "INFO",
                **self.environment,
            }
        )
        started = time.perf_counter()
        self.holder = subprocess.Popen(
            [sys.executable, "-m", "tests.support.snapstart", "hold", self.socket_path],
            cwd=REPO,
            env=env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.socket_path):
            if self.holder.poll() is not None:
                raise RuntimeError(f"the SnapStart INIT failed; see {self.log_path}:\n{self.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the SnapStart INIT did not reach the snapshot; see {self.log_path}")
            time.sleep(0.05)
        self.init_seconds = time.perf_counter() - started
        return self

    def restore(self) -> LambdaEmulator:
        """A new execution environment restored from the snapshot, behind the real emulator."""
        index = len(self.restored)
        environment = {**self.environment}
        emulator = LambdaEmulator(
            environment,
            self.root / f"restored-{index}.log",
            memory_mb=self.memory_mb,
            bootstrap=[sys.executable, "-m", "tests.support.snapstart", "restore", self.socket_path],
        ).start()
        self.restored.append(emulator)
        return emulator

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def snapshot(self) -> dict[str, Any]:
        """`snapshot_report()` as the holder wrote it at the snapshot point."""
        return json.loads(Path(self.socket_path + ".json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]

    def stop(self) -> None:
        for emulator in self.restored:
            emulator.stop()
        if self.holder is not None:
            stop_process(self.holder)


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "hold":
        hold(argv[1])
        return 0
    if len(argv) == 2 and argv[0] == "restore":
        return restore(argv[1])
    print("usage: python -m tests.support.snapstart hold|restore SOCKET", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
