"""`LLMClient`: a small client for the API. Imports no torch or transformers: only `requests`.

    from function.client import LLMClient
    client = LLMClient("http://localhost:8000", api_key="…")
    print(client.health_check()["status"])
    print(client.chat(instruction="Python의 장점을 설명하세요", max_new_tokens=200)["response"])

Results are typed dicts (the original guide's `result['response']` works). Errors raise
`APIError` carrying the server's error body. 429 and 503 are retried, honouring `Retry-After`.
Runnable examples, as the guide's `api_client.py`: `python -m function.client basic|chat|batch`.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypedDict, cast

import requests

RETRYABLE = (429, 503)


class Health(TypedDict):
    status: str
    model_loaded: bool
    model_name: str | None
    device: str
    reason: str | None


class Usage(TypedDict):
    prompt_tokens: int
    completion_tokens: int


class Generation(TypedDict):
    generated_text: list[str]
    prompt: str
    model_name: str
    generation_time: float
    finish_reason: list[str]
    usage: Usage


class ChatAnswer(TypedDict):
    response: str
    instruction: str
    model_name: str
    generation_time: float
    finish_reason: str
    usage: Usage


class LoadedModelInfo(TypedDict):
    status: str
    model_name: str
    model_path: str
    device: str
    quantization: str
    load_time: float
    previous_model_name: str | None


class APIError(Exception):
    """An error answer: `status`, `code`, `message` and the whole `body` the server sent."""

    def __init__(self, status: int, body: Any) -> None:
        error = body.get("error", {}) if isinstance(body, dict) else {}
        self.status = status
        self.body = body
        self.code = str(error.get("code", "http_error"))
        self.message = str(error.get("message", body if isinstance(body, str) else f"HTTP {status}"))
        super().__init__(f"{status} {self.code}: {self.message}")


class LLMClient:
    """Calls one llm-function server (or its API Gateway URL)."""

    def __init__(
        self,
        base_url: str = "http://localhost:8000",
        api_key: str | None = None,
        timeout: float = 120.0,
        *,
        max_retries: int = 3,
        max_retry_wait: float = 30.0,
        max_workers: int = 4,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.max_retries = max_retries
        self.max_retry_wait = max_retry_wait
        self.max_workers = max_workers
        self._session = requests.Session()
        if api_key:
            self._session.headers["X-API-Key"] = api_key

    def health_check(self) -> Health:
        """/health; a 503 (no model) is an answer here, not an error."""
        response = self._session.get(f"{self.base_url}/health", timeout=self.timeout)
        if response.status_code not in (200, 503):
            raise APIError(response.status_code, _body(response))
        return cast(Health, response.json())

    def generate(self, prompt: str, **parameters: Any) -> Generation:
        """/generate: `max_new_tokens`, `temperature`, `top_p`, `top_k`, `repetition_penalty`, `do_sample`,
        `num_return_sequences`, `stop`, `seed`, as the server takes them."""
        return cast(Generation, self._request("POST", "/generate", json={"prompt": prompt, **parameters}))

    def chat(self, instruction: str, input: str = "", **parameters: Any) -> ChatAnswer:
        return cast(
            ChatAnswer,
            self._request("POST", "/chat", json={"instruction": instruction, "input": input, **parameters}),
        )

    def model_info(self) -> dict[str, Any]:
        return cast(dict[str, Any], self._request("GET", "/model_info"))

    def load_model(
        self, model_path: str, load_in_8bit: bool = False, load_in_4bit: bool = False
    ) -> LoadedModelInfo:
        params = {
            "model_path": model_path,
            "load_in_8bit": str(load_in_8bit).lower(),
            "load_in_4bit": str(load_in_4bit).lower(),
        }
        return cast(LoadedModelInfo, self._request("POST", "/load_model", params=params))

    def batch(self, prompts: Sequence[str], **parameters: Any) -> list[Generation]:
        """/generate for each prompt, at most `max_workers` at a time; results in the prompts' order."""
        with ThreadPoolExecutor(max_workers=self.max_workers) as pool:
            return list(pool.map(lambda prompt: self.generate(prompt, **parameters), prompts))

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        for attempt in range(self.max_retries + 1):
            response = self._session.request(method, f"{self.base_url}{path}", timeout=self.timeout, **kwargs)
            if response.status_code < 400:
                return response.json()
            wait = _retry_after(response)
            if (
                response.status_code not in RETRYABLE
                or attempt == self.max_retries
                or wait > self.max_retry_wait
            ):
                raise APIError(response.status_code, _body(response))
            time.sleep(wait)
        raise AssertionError("unreachable")  # pragma: no cover


def _retry_after(response: requests.Response) -> float:
    value = response.headers.get("Retry-After", "1")
    try:
        return max(0.0, float(value))
    except ValueError:
        return 1.0


def _body(response: requests.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return response.text


def run_example(name: str, client: LLMClient) -> None:
    """The guide's api_client.py examples."""
    if name == "basic":
        health = client.health_check()
        print(f"상태: {health['status']} (model: {health['model_name']}, device: {health['device']})")
        result = client.generate("Python이란 무엇인가요?", max_new_tokens=50)
        print(result["generated_text"][0])
    elif name == "chat":
        answer = client.chat(instruction="Python의 장점을 설명하세요", max_new_tokens=200)
        print(answer["response"])
    else:
        prompts = ["Python이란?", "머신러닝이란?", "What is an API?", "서버리스란?"]
        for prompt, result in zip(prompts, client.batch(prompts, max_new_tokens=30), strict=True):
            print(f"{prompt} -> {result['generated_text'][0][len(prompt) :]!r}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m function.client", description="Client examples.")
    parser.add_argument("example", nargs="?", choices=("basic", "chat", "batch", "all"), default="all")
    parser.add_argument(
        "--url", default="http://localhost:8000", help="server URL (default: http://localhost:8000)"
    )
    parser.add_argument("--api-key", default=None, help="API key, sent as X-API-Key")
    args = parser.parse_args(argv)
    client = LLMClient(args.url, api_key=args.api_key)
    try:
        for name in ("basic", "chat", "batch") if args.example == "all" else (args.example,):
            print(f"== {name} ==")
            run_example(name, client)
    except (APIError, requests.RequestException) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
