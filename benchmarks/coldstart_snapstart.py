"""The cold start under the Lambda emulator: on demand, and restored from a SnapStart snapshot (emulated).

- on demand: the real Runtime Interface Emulator around the handler, today's default (`/tmp` cache), from
  the emulator's start to the answer of the first `/generate` (one new token);
- SnapStart (`tests.support.snapstart.SnapStartEmulation`): the INIT in a holder process (weights in
  memory, warm-up, before-snapshot hooks), then a restored environment forked from it behind a real
  emulator, from the restore's start to the answer of its first `/generate` (one new token); then two
  64-token greedy generations for the decode speed, with TORCH_COMPILE off or on (compiled in the
  INIT's warm-up, before the snapshot; a fresh inductor cache per INIT, as a publish has).

What a fork cannot show is the restore itself: Lambda resumes the microVM from its snapshot cache,
reported as `Restore Duration`; see docs/benchmarks.md.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from tests.support.local_aws import LambdaEmulator, peak_rss_mb
from tests.support.snapstart import SnapStartEmulation

FIRST_PROMPT = "What is the capital of France?"
# Greedy, this prompt runs to 64 tokens without an end of sequence. Sent DECODE_REQUESTS times (the response
# cache is off): the first request after a restore, then the same again once any shape it needed is compiled.
DECODE_PROMPT = "Once upon a time, in a small village by the sea,"
DECODE_TOKENS = 64
DECODE_REQUESTS = 3  # the first after the restore, then the same twice more (the last: the steady speed)
INVOKE_TIMEOUT_S = 600  # a compile inside a restored environment can take minutes on two cores


def generate_event(prompt: str, max_new_tokens: int) -> dict[str, Any]:
    return {
        "path": "/generate",
        "method": "POST",
        "body": {"prompt": prompt, "max_new_tokens": max_new_tokens, "temperature": 0},
    }


def generate(function: LambdaEmulator, prompt: str, max_new_tokens: int) -> dict[str, Any]:
    """One /generate through the emulator; its body (raises on a non-200 answer)."""
    answer = function.invoke(generate_event(prompt, max_new_tokens), timeout=INVOKE_TIMEOUT_S)
    if answer.get("statusCode") != 200:
        raise RuntimeError(f"/generate answered {answer.get('statusCode')}: {str(answer.get('body'))[:500]}")
    body: dict[str, Any] = answer["body"]
    return body


def cold_start_phases(function: LambdaEmulator) -> dict[str, Any]:
    info = function.invoke({"path": "/model_info", "method": "GET"})["body"]
    phases: dict[str, Any] = info.get("cold_start") or {}
    return phases


def init_report_s(function: LambdaEmulator) -> float | None:
    """The emulator's `INIT REPORT(durationMs: ...)`: from the runtime's start to its first /next."""
    match = re.search(r"INIT REPORT\(durationMs: ([\d.]+)\)", function.log())
    return float(match.group(1)) / 1000 if match else None


def on_demand(environment: dict[str, str], root: Path) -> dict[str, Any]:
    """An on-demand environment (WEIGHTS_IN_MEMORY=false, the /tmp cache) to its first token."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**environment, "WEIGHTS_IN_MEMORY": "false", "MODEL_CACHE_DIR": str(root / "tmp")}
    started = time.perf_counter()
    function = LambdaEmulator(env, root / "on-demand.log", memory_mb=3008).start()
    try:
        generate(function, FIRST_PROMPT, 1)
        first_token_s = time.perf_counter() - started
        pid = function.runtime_pid()
        peak = peak_rss_mb(pid) if pid else float("nan")
        phases = cold_start_phases(function)
        init_s = init_report_s(function)
    finally:
        function.stop()
    return {
        "to_first_token_s": first_token_s,
        "init_duration_s": init_s,
        "engine_first_token_s": phases.get("first_token_s"),
        "ready_s": phases.get("ready_s"),
        "peak_rss_mb": peak,
    }


def snapstart(environment: dict[str, str], root: Path, *, compiled: bool) -> dict[str, Any]:
    """A SnapStart INIT (emulated), one environment restored from it: first token, then decode speed."""
    root.mkdir(parents=True, exist_ok=True)
    env = {
        **environment,
        "WEIGHTS_IN_MEMORY": "true",
        "MODEL_CACHE_DIR": str(root / "tmp"),
        "TORCH_COMPILE": "true" if compiled else "false",
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),  # cold, as at a publish
        # Inductor's compile thread pool does not survive the fork that stands in for the snapshot (a real
        # restore keeps threads): a recompile in the restored environment would wait on it forever.
        "TORCHINDUCTOR_COMPILE_THREADS": "1",
        # Room for a recompile inside a restored environment, so that it is measured rather than cut.
        "AWS_LAMBDA_FUNCTION_TIMEOUT": "600",
        "TORCH_LOGS": "recompiles",  # each recompile is logged: counted below
    }
    emulation = SnapStartEmulation(env, root, memory_mb=3008)
    figures: dict[str, Any] = {"compiled": compiled}
    try:
        emulation.start(timeout=900)
        figures["init_s"] = emulation.init_seconds
        if emulation.holder is not None:
            figures["init_peak_rss_mb"] = peak_rss_mb(emulation.holder.pid)
        started = time.perf_counter()
        function = emulation.restore()
        generate(function, FIRST_PROMPT, 1)
        figures["restore_to_first_token_s"] = time.perf_counter() - started
        figures["restored_init_duration_s"] = init_report_s(function)
        phases = cold_start_phases(function)
        figures.update(
            restored=phases.get("restored"),
            restore_hooks_s=phases.get("restore_s"),
            engine_first_token_s=phases.get("first_token_s"),
            warm_up_s=phases.get("warm_up_s"),
            snapshot_ready_s=phases.get("ready_s"),
        )
        for index in range(DECODE_REQUESTS):
            request_started = time.perf_counter()
            body = generate(function, DECODE_PROMPT, DECODE_TOKENS)
            tokens = int(body["usage"]["completion_tokens"])
            figures[f"decode_{index}_tokens"] = tokens
            figures[f"decode_{index}_tokens_per_s"] = tokens / float(body["generation_time"])
            figures[f"decode_{index}_request_s"] = time.perf_counter() - request_started
        figures["warm_up_failed"] = "warm-up generation failed" in emulation.log()
        figures["restored_recompiles"] = function.log().count("Recompiling function")
    except Exception as exc:  # a failed compile is a figure too: reported, not fatal to the run
        figures["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        figures["warm_up_failed"] = "warm-up generation failed" in _log_or_empty(emulation)
    finally:
        emulation.stop()
    return figures


def _log_or_empty(emulation: SnapStartEmulation) -> str:
    try:
        return emulation.log()
    except OSError:
        return ""
