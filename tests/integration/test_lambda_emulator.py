"""The function in the real Lambda Runtime Interface Emulator, with its weights in a real S3 server.

SeaweedFS holds the published demo model; the emulator runs `python -m awslambdaric
function.handler.handler` (the Dockerfile's CMD) and cold-starts from `s3://`. Every sample in
events/ and SAM-generated v1 and v2 events for each route are answered, greedy answers equal
those of a uvicorn server, and S3 failures give 503 with a reason, then recover.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
import requests

from tests.support.events import assert_sample_answered, event_names, http_body, load_event
from tests.support.local_aws import SAM_VENV, LambdaEmulator, SeaweedFS, stop_process
from tests.support.ports import free_port
from tests.support.s3 import upload_model
from tests.support.servers import wait_healthy

pytestmark = pytest.mark.emulator
BUCKET = "models"
PREFIX = "demo/final_model/"
MODEL_URI = f"s3://{BUCKET}/{PREFIX}"
GREEDY_GENERATE = {"prompt": "Python이란 무엇인가요?", "max_new_tokens": 16, "temperature": 0}
GREEDY_CHAT = {"instruction": "머신러닝을 설명하세요", "max_new_tokens": 16, "temperature": 0}


@pytest.fixture(scope="module")
def seaweed(tmp_path_factory: pytest.TempPathFactory, demo_model_dir: Path) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs")).start()
    client = server.client()
    client.create_bucket(Bucket=BUCKET)
    upload_model(client, BUCKET, PREFIX, demo_model_dir)
    yield server
    server.stop()


def function_environment(seaweed: SeaweedFS, cache: Path, model_uri: str = MODEL_URI) -> dict[str, str]:
    return {
        **seaweed.environment(),
        "MODEL_PATH": model_uri,
        "MODEL_CACHE_DIR": str(cache),
        "CPU_DTYPE": "float32",
        "HF_HOME": str(cache / "hf"),
        "LOAD_RETRY_INTERVAL_S": "0",
    }


@pytest.fixture(scope="module")
def emulator(seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LambdaEmulator]:
    root = tmp_path_factory.mktemp("lambda")
    function = LambdaEmulator(function_environment(seaweed, root / "tmp"), root / "rie.log").start()
    yield function
    function.stop()


@pytest.fixture(scope="module")
def uvicorn_url(seaweed: SeaweedFS, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The same image's server mode: uvicorn with MODEL_PATH on the same S3 model."""
    port = free_port()
    env = {key: value for key, value in os.environ.items() if not key.startswith(("AWS_", "MODEL_"))}
    env.update(function_environment(seaweed, tmp_path_factory.mktemp("server-cache")))
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "function.app:app", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url
    finally:
        stop_process(process)


def header(response: dict[str, Any], name: str) -> str | None:
    headers = {k.lower(): v for k, v in (response.get("headers") or {}).items()}
    multi = {k.lower(): v[-1] for k, v in (response.get("multiValueHeaders") or {}).items()}
    return headers.get(name) or multi.get(name)


def test_the_first_invocation_is_a_cold_start_from_s3(emulator: LambdaEmulator) -> None:
    response = emulator.invoke({"path": "/model_info", "method": "GET"})

    assert response["statusCode"] == 200
    assert response["headers"]["x-cold-start"] == "true"
    cold = response["body"]["cold_start"]
    assert cold["fetch_bytes"] > 0 and cold["fetch_from_cache"] is False and cold["imports_s"] > 0
    assert response["body"]["model_name"] == "final_model" and response["body"]["model_path"] == MODEL_URI
    assert emulator.init_duration_ms() is not None  # the emulator's REPORT line


@pytest.mark.parametrize("name", event_names())
def test_every_sample_event(emulator: LambdaEmulator, name: str) -> None:
    assert_sample_answered(name, emulator.invoke(load_event(name)))


ROUTES: list[tuple[str, str, dict[str, Any] | None, str]] = [
    ("GET", "/health", None, "status"),
    ("GET", "/model_info", None, "model_name"),
    ("POST", "/generate", GREEDY_GENERATE, "generated_text"),
    ("POST", "/chat", GREEDY_CHAT, "response"),
    ("GET", "/openapi.json", None, "paths"),
    ("GET", "/docs", None, "swagger"),
    ("GET", "/redoc", None, "redoc"),
    ("GET", "/v1/models", None, "data"),
    ("POST", "/v1/completions", {"prompt": "Python", "max_tokens": 8, "temperature": 0}, "choices"),
    (
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "안녕하세요"}], "max_tokens": 8},
        "choices",
    ),
]


def sam_event(kind: str, method: str, path: str, body: dict[str, Any] | None) -> dict[str, Any]:
    """`sam local generate-event apigateway aws-proxy|http-api-proxy` for one route."""
    command = [
        str(SAM_VENV / "bin" / "sam"),
        "local",
        "generate-event",
        "apigateway",
        kind,
        "--method",
        method,
        "--path",
        path.lstrip("/"),
    ]
    if body is not None:
        command += ["--body", json.dumps(body, ensure_ascii=False)]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env={**os.environ, "SAM_CLI_TELEMETRY": "0"}
    )
    assert result.returncode == 0, result.stderr
    event: dict[str, Any] = json.loads(result.stdout)
    if kind == "aws-proxy":
        event["headers"]["Content-Type"] = "application/json"
        event["multiValueHeaders"]["Content-Type"] = ["application/json"]
        event["path"] = path
    else:
        event["headers"]["content-type"] = "application/json"
        event["rawPath"] = path
        event["requestContext"]["http"]["path"] = path
    return event


@pytest.fixture(scope="module")
def sam_events() -> dict[tuple[str, str], dict[str, Any]]:
    jobs = [
        (kind, method, path, body)
        for kind in ("aws-proxy", "http-api-proxy")
        for method, path, body, _ in ROUTES
    ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        events = list(pool.map(lambda job: sam_event(*job), jobs))
    return {(job[0], job[2]): event for job, event in zip(jobs, events, strict=True)}


@pytest.mark.parametrize("kind", ["aws-proxy", "http-api-proxy"])
@pytest.mark.parametrize(("method", "path", "body", "marker"), ROUTES)
def test_sam_generated_events_for_each_route(
    emulator: LambdaEmulator,
    sam_events: dict[tuple[str, str], Any],
    kind: str,
    method: str,
    path: str,
    body: Any,
    marker: str,
) -> None:
    response = emulator.invoke(sam_events[(kind, path)])

    assert response["statusCode"] == 200, response
    answer = http_body(response)
    assert marker in (answer if isinstance(answer, dict) else answer.lower())


def test_greedy_answers_equal_uvicorns(emulator: LambdaEmulator, uvicorn_url: str) -> None:
    for route, body in (("/generate", GREEDY_GENERATE), ("/chat", GREEDY_CHAT)):
        from_lambda = emulator.invoke({"path": route, "method": "POST", "body": body})["body"]
        from_server = requests.post(f"{uvicorn_url}{route}", json=body, timeout=120).json()
        key = "generated_text" if route == "/generate" else "response"
        assert from_lambda[key] == from_server[key]


def test_a_restart_that_keeps_tmp_does_not_download_again(seaweed: SeaweedFS, tmp_path: Path) -> None:
    environment = function_environment(seaweed, tmp_path / "tmp")
    first = LambdaEmulator(environment, tmp_path / "first.log").start()
    try:
        cold = first.invoke({"path": "/model_info", "method": "GET"})["body"]["cold_start"]
    finally:
        first.stop()
    second = LambdaEmulator(environment, tmp_path / "second.log").start()
    try:
        warm_tmp = second.invoke({"path": "/model_info", "method": "GET"})["body"]["cold_start"]
    finally:
        second.stop()

    assert cold["fetch_from_cache"] is False and cold["fetch_bytes"] > 0
    assert warm_tmp["fetch_from_cache"] is True and warm_tmp["fetch_bytes"] == 0


def test_missing_weights_answer_503_with_a_reason_then_recover(
    seaweed: SeaweedFS, demo_model_dir: Path, tmp_path: Path
) -> None:
    prefix = "later/final_model/"
    function = LambdaEmulator(
        function_environment(seaweed, tmp_path / "tmp", f"s3://{BUCKET}/{prefix}"), tmp_path / "rie.log"
    ).start()
    try:
        health = function.invoke({"path": "/health", "method": "GET"})
        generate = function.invoke({"path": "/generate", "method": "POST", "body": GREEDY_GENERATE})
        assert health["statusCode"] == 503 and "no model files" in health["body"]["reason"]
        assert generate["statusCode"] == 503 and generate["headers"]["retry-after"]
        assert f"s3://{BUCKET}" not in json.dumps(generate["body"])

        upload_model(seaweed.client(), BUCKET, prefix, demo_model_dir)  # the weights arrive

        assert function.invoke({"path": "/health", "method": "GET"})["statusCode"] == 200
        assert (
            function.invoke({"path": "/generate", "method": "POST", "body": GREEDY_GENERATE})["statusCode"]
            == 200
        )
    finally:
        function.stop()


def test_keys_come_from_the_secret_read_at_init(seaweed: SeaweedFS, tmp_path: Path) -> None:
    from moto.server import ThreadedMotoServer

    secrets_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    secrets_server.start()
    try:
        endpoint = f"http://127.0.0.1:{secrets_server._server.server_port}"  # type: ignore[union-attr]
        secrets = boto3.client(
            "secretsmanager",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id="local",
            aws_secret_access_key="local-secret",
        )
        arn = secrets.create_secret(
            Name="llm-function/keys",
            SecretString=json.dumps(
                {"api_keys": ["emulator-user-key"], "admin_api_keys": ["emulator-admin-key"]}
            ),
        )["ARN"]
        environment = {
            **function_environment(seaweed, tmp_path / "tmp"),
            "API_KEYS_SECRET_ARN": arn,
            "AWS_ENDPOINT_URL_SECRETS_MANAGER": endpoint,
        }
        function = LambdaEmulator(environment, tmp_path / "rie.log").start()
        try:
            request = {"path": "/generate", "method": "POST", "body": GREEDY_GENERATE}
            without_key = function.invoke(request)
            with_user_key = function.invoke({**request, "headers": {"x-api-key": "emulator-user-key"}})
            load = function.invoke(
                {
                    "path": "/load_model",
                    "method": "POST",
                    "query": {"model_path": MODEL_URI},
                    "headers": {"authorization": "Bearer emulator-admin-key"},
                }
            )
        finally:
            function.stop()
    finally:
        secrets_server.stop()

    assert without_key["statusCode"] == 401
    assert with_user_key["statusCode"] == 200
    assert load["statusCode"] == 403 and "Redeploy" in load["body"]["error"]["message"]


def json_lines(log: str) -> list[dict[str, Any]]:
    found = []
    for line in log.splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            found.append(json.loads(line[start:]))
        except ValueError:
            continue
    return found


def test_powertools_logs_and_emf_metrics(seaweed: SeaweedFS, tmp_path: Path) -> None:
    function = LambdaEmulator(function_environment(seaweed, tmp_path / "tmp"), tmp_path / "rie.log").start()
    try:
        generated = function.invoke({"path": "/generate", "method": "POST", "body": GREEDY_GENERATE})
        function.invoke({"path": "/health", "method": "GET"})
        lines = json_lines(function.log())
    finally:
        function.stop()

    request_lines = [line for line in lines if line.get("message") == "request"]
    generate = next(line for line in request_lines if line["route"] == "/generate")
    assert generate["service"] == "llm-function" and generate["function_request_id"]
    assert generate["cold_start"] is True and generate["status"] == 200
    assert generate["completion_tokens"] == generated["body"]["usage"]["completion_tokens"]
    assert generate["generation_s"] > 0 and generate["request_s"] >= generate["generation_s"]
    assert next(line for line in request_lines if line["route"] == "/health")["cold_start"] is False
    cold = next(line for line in lines if line.get("event") == "cold_start")
    assert cold["fetch_bytes"] > 0 and cold["first_token_s"] > 0
    emf = [line for line in lines if "_aws" in line]
    names = {
        m["Name"] for line in emf for block in line["_aws"]["CloudWatchMetrics"] for m in block["Metrics"]
    }
    assert {
        "ColdStart",
        "TokensGenerated",
        "GenerationSeconds",
        "LoadSeconds",
        "FetchSeconds",
        "FetchMBps",
    } <= names
    assert all(
        block["Namespace"] == "LlmFunction" for line in emf for block in line["_aws"]["CloudWatchMetrics"]
    )


def test_published_model_cold_starts_and_tampering_is_refused(
    seaweed: SeaweedFS, demo_model_dir: Path, tmp_path: Path
) -> None:
    from function.weights.publish import publish_model

    result = publish_model(
        demo_model_dir, "s3://models/published/final_model/", client=seaweed.client(), progress=False
    )
    function = LambdaEmulator(
        function_environment(seaweed, tmp_path / "tmp", result.model_path), tmp_path / "rie.log"
    ).start()
    try:
        info = function.invoke({"path": "/model_info", "method": "GET"})
    finally:
        function.stop()
    assert info["statusCode"] == 200 and info["body"]["model_path"] == result.model_path

    seaweed.client().put_object(
        Bucket="models",
        Key="published/final_model/tokenizer.json",
        Body=(demo_model_dir / "tokenizer.json").read_bytes()[:-10],
    )
    tampered = LambdaEmulator(
        function_environment(seaweed, tmp_path / "tmp2", result.model_path), tmp_path / "rie2.log"
    ).start()
    try:
        health = tampered.invoke({"path": "/health", "method": "GET"})
    finally:
        tampered.stop()
    assert health["statusCode"] == 503 and "manifest" in health["body"]["reason"]
