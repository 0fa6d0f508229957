"""`python -m function test-api`: the original guide's test_api.py, against a running server.

Modes: `health`, `chat`, `all` (every route a client uses) and `interactive` (a REPL that asks
questions through /chat). Each exits non-zero on failure.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TextIO

import requests

from function.client import APIError, LLMClient


def check_health(client: LLMClient, out: TextIO) -> bool:
    health = client.health_check()
    print(
        f"[health] status={health['status']} model={health['model_name']} device={health['device']}", file=out
    )
    if health["status"] != "healthy":
        print(f"[health] not healthy: {health['reason']}", file=out)
    return health["status"] == "healthy"


def check_chat(client: LLMClient, out: TextIO) -> bool:
    answer = client.chat(instruction="머신러닝을 설명하세요", max_new_tokens=64)
    print(
        f"[chat] {answer['generation_time']:.2f}s finish={answer['finish_reason']}: {answer['response']}",
        file=out,
    )
    return True


def check_generate(client: LLMClient, out: TextIO) -> bool:
    result = client.generate("Python이란 무엇인가요?", max_new_tokens=32)
    print(f"[generate] {result['generation_time']:.2f}s: {result['generated_text'][0]}", file=out)
    return result["generated_text"][0].startswith("Python이란 무엇인가요?")


def check_model_info(client: LLMClient, out: TextIO) -> bool:
    info = client.model_info()
    print(
        f"[model_info] {info['model_name']} on {info['device']}, {info['dtype']}, "
        f"{info['parameter_count']:,} parameters, GPU memory {info['gpu_memory_allocated']}",
        file=out,
    )
    return True


def check_batch(client: LLMClient, out: TextIO) -> bool:
    prompts = ["Python이란?", "머신러닝이란?", "What is an API?"]
    results = client.batch(prompts, max_new_tokens=16)
    print(f"[batch] {len(results)} answers for {len(prompts)} prompts", file=out)
    return [r["prompt"] for r in results] == prompts


CHECKS: dict[str, list[Callable[[LLMClient, TextIO], bool]]] = {
    "health": [check_health],
    "chat": [check_chat],
    "all": [check_health, check_model_info, check_generate, check_chat, check_batch],
}


def run_checks(client: LLMClient, mode: str, out: TextIO = sys.stdout) -> int:
    failures = 0
    for check in CHECKS[mode]:
        try:
            ok = check(client, out)
        except (APIError, requests.RequestException) as exc:
            print(f"[{check.__name__.removeprefix('check_')}] FAILED: {exc}", file=out)
            ok = False
        failures += not ok
    print(f"{len(CHECKS[mode]) - failures} passed, {failures} failed", file=out)
    return 1 if failures else 0


def interactive(client: LLMClient, stdin: TextIO = sys.stdin, out: TextIO = sys.stdout) -> int:
    """Ask questions through /chat until `quit`, `exit` or end of input."""
    try:
        if not check_health(client, out):
            return 1
    except requests.RequestException as exc:
        print(f"cannot reach the server: {exc}", file=out)
        return 1
    print("질문을 입력하세요 (quit 또는 exit로 종료)", file=out)
    while True:
        print("질문> ", end="", file=out, flush=True)
        line = stdin.readline()
        if not line or line.strip().lower() in ("quit", "exit"):
            print("", file=out)
            return 0
        if not line.strip():
            continue
        try:
            answer = client.chat(instruction=line.strip(), max_new_tokens=128)
            print(f"답변: {answer['response']}  ({answer['generation_time']:.2f}s)", file=out)
        except APIError as exc:
            print(f"오류: {exc}", file=out)
