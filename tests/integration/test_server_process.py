"""A real server process, started the ways the README says, answering the README's guide examples."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.support.ports import free_port
from tests.support.servers import REPO, serve_command, served, start, stop, wait_healthy

README = REPO / "README.md"
pytestmark = pytest.mark.server


@pytest.fixture(scope="module")
def cli_server(demo_model_dir: Path) -> Iterator[str]:
    """`python -m function serve --model_path DIR --host … --port …`, as the README's Serving table says."""
    with served(demo_model_dir) as base_url:
        yield base_url


def readme_block(marker: str) -> str:
    text = README.read_text(encoding="utf-8")
    match = re.search(re.escape(f"<!-- {marker} -->") + r"\s*```\w+\n(.*?)```", text, re.DOTALL)
    assert match, f"README has no block after <!-- {marker} -->"
    return match.group(1)


def json_documents(text: str) -> list[dict[str, Any]]:
    decoder, documents, index = json.JSONDecoder(), [], 0
    while index < len(text):
        if text[index].isspace():
            index += 1
            continue
        document, index = decoder.raw_decode(text, index)
        documents.append(document)
    return documents


def test_the_guides_curl_examples_verbatim(cli_server: str) -> None:
    script = readme_block("guide-examples:bash").replace("http://localhost:8000", cli_server)

    result = subprocess.run(["bash", "-e", "-c", script], capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr
    health, generated, chat = json_documents(result.stdout)
    assert health["status"] == "healthy" and health["model_name"] == "final_model"
    assert generated["generated_text"][0].startswith("Python이란?")
    assert {"prompt", "model_name", "generation_time"} <= generated.keys()
    assert chat["instruction"] == "머신러닝을 설명하세요" and isinstance(chat["response"], str)


def test_the_guides_python_requests_example_verbatim(cli_server: str) -> None:
    script = readme_block("guide-examples:python").replace("http://localhost:8000", cli_server)

    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)

    assert result.returncode == 0, result.stderr  # a KeyError on result['response'] would fail here


@pytest.mark.skipif(shutil.which("node") is None, reason="needs Node.js 18+ (fetch, top-level await)")
def test_the_guides_javascript_fetch_example_verbatim(cli_server: str) -> None:
    script = readme_block("guide-examples:javascript").replace("http://localhost:8000", cli_server)
    # The guide's last line prints data.response; undefined would print too, so check its type.
    script += "\nif (typeof data.response !== 'string' || !response.ok) process.exit(3);\n"

    result = subprocess.run(
        ["node", "--input-type=module", "-e", script], capture_output=True, text=True, timeout=300
    )

    assert result.returncode == 0, result.stderr


def test_head_health_over_the_wire(cli_server: str) -> None:
    response = requests.head(f"{cli_server}/health", timeout=30)

    assert response.status_code == 200 and response.content == b""


def test_docs_work_without_internet(cli_server: str) -> None:
    # GIVEN the Swagger UI page of a real server
    page = requests.get(f"{cli_server}/docs", timeout=30).text

    # THEN each script and stylesheet it loads comes from that server
    assets = re.findall(r'(?:src|href)="(/docs/assets/[^"]+)"', page)
    assert len(assets) == 3  # stylesheet, favicon, script
    for asset in assets:
        assert requests.get(cli_server + asset, timeout=30).status_code == 200, asset


def test_errors_over_the_wire_have_the_one_shape(cli_server: str) -> None:
    bad = requests.post(
        f"{cli_server}/generate", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=30
    )
    out_of_bounds = requests.post(f"{cli_server}/generate", json={"prompt": "a", "top_p": 2}, timeout=30)

    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_json"
    assert out_of_bounds.status_code == 422
    assert out_of_bounds.json()["error"]["details"][0] == {
        "field": "top_p",
        "message": "Input should be less than or equal to 1",
        "limit": 1.0,
    }


def test_uvicorn_with_model_path_in_the_environment(demo_model_dir: Path) -> None:
    port = free_port()
    process = start(
        [sys.executable, "-m", "uvicorn", "function.app:app", "--host", "127.0.0.1", "--port", str(port)],
        env={"MODEL_PATH": str(demo_model_dir)},
    )
    try:
        health = wait_healthy(f"http://127.0.0.1:{port}", process)
    finally:
        stop(process)

    assert health["model_name"] == "final_model"


def test_serve_with_reload_and_a_quantization_flag(other_model_dir: Path) -> None:
    port = free_port()
    process = start(serve_command(other_model_dir, port, "--load_in_8bit", "--reload"))
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, process)
        info = requests.get(f"{base_url}/model_info", timeout=30).json()
    finally:
        stop(process)

    assert info["model_name"] == "other_model" and info["quantization"] == "8bit"


def test_concurrent_requests_share_a_batch_and_get_the_answers_they_get_alone(
    cli_server: str, demo_model_dir: Path
) -> None:
    # GIVEN the answers of a server that handles the requests one at a time
    prompts = ["Hello", "머신러닝이란 무엇인가요?", "The quick brown fox jumps", "a"]
    bodies = [{"prompt": prompt, "max_new_tokens": 12, "temperature": 0} for prompt in prompts]
    alone = [requests.post(f"{cli_server}/generate", json=body, timeout=60).json() for body in bodies]
    # AND a server whose batches wait for four requests
    port = free_port()
    process = start(
        serve_command(demo_model_dir, port), env={"BATCH_MAX_SIZE": "4", "BATCH_WINDOW_MS": "1000"}
    )
    base_url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base_url, process)

        # WHEN the four arrive together
        with ThreadPoolExecutor(max_workers=4) as pool:
            together = list(
                pool.map(
                    lambda body: requests.post(f"{base_url}/generate", json=body, timeout=60).json(), bodies
                )
            )
        metrics = requests.get(f"{base_url}/metrics", timeout=10).text
    finally:
        stop(process)

    # THEN each gets the text and usage it gets alone, from one generate call of four
    for batched, single in zip(together, alone, strict=True):
        assert batched["generated_text"] == single["generated_text"]
        assert batched["usage"] == single["usage"]
    assert "llm_batch_size_count 4.0" in metrics
    assert "llm_batch_size_sum 16.0" in metrics
