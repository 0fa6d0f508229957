"""The decoder's layer loop in C++ (function.engine.native) against the same loop in Python: bitwise
the same logits alone, in exact and in plain batches, for float, int8 and int4 layers; and the reason
/model_info gives when it is off, not built, or built for another torch. `make test` builds it first
(`python -m function build-native`): these tests fail, not skip, where it is missing."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from function.__main__ import main
from function.engine import native
from function.engine.calibration import calibrate
from function.engine.decoder import Decoder
from function.engine.decoder_choice import native_choice
from function.engine.engine import Engine
from function.engine.types import SamplingParams
from tests.support.settings import make_settings
from tests.support.tiny_models import fused_copy, tiny

PROMPTS = [[5, 17, 33, 2, 9], [40], [7, 7, 12]]


def stepped(decoder: Decoder, steps: int = 4) -> list[torch.Tensor]:
    """Every logit of: `PROMPTS` prefilled, then `steps` greedy steps as an exact batch, as a plain
    batch (rows attending together), and the first row alone."""
    logits: list[torch.Tensor] = []
    for mode in ("exact", "together", "alone"):
        prompts = PROMPTS[:1] if mode == "alone" else PROMPTS
        cache = decoder.new_cache(len(prompts), 16)
        last = torch.cat([decoder.prefill_row(torch.tensor(p), cache, row) for row, p in enumerate(prompts)])
        positions = torch.tensor([[len(p)] for p in prompts])
        for _ in range(steps):
            tokens = last.argmax(-1)[:, None]
            if mode == "alone":
                last = decoder.forward(tokens, positions, cache, int(positions[0, 0]))
            else:
                last = decoder.step_rows(tokens, positions, cache, exact=mode == "exact")
            logits.append(last)
            positions = positions + 1
    return logits


def in_python_and_in_cpp(decoder: Decoder) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    layers, reason = native_choice(decoder, "auto")
    assert reason == "layers stepped in C++", reason
    with torch.inference_mode():
        decoder.native = None
        python = stepped(decoder)
        decoder.native = layers
        cpp = stepped(decoder)
    return python, cpp


@pytest.mark.parametrize(
    ("kind", "dtype", "calibrated"),
    [
        ("llama", torch.bfloat16, True),  # tied embeddings, GQA, exact batches
        ("qwen2", torch.bfloat16, True),  # biases on q, k and v
        ("llama3", torch.float32, False),  # rescaled RoPE; float32 batches are not calibrated
    ],
)
def test_the_cpp_loop_gives_the_python_loops_logits_bitwise(
    kind: str, dtype: torch.dtype, calibrated: bool
) -> None:
    decoder = Decoder(fused_copy(tiny(kind, dtype)))
    if calibrated:
        with torch.inference_mode():
            assert calibrate(decoder, len(PROMPTS))
        assert decoder.block_spans and decoder.least_rows

    python, cpp = in_python_and_in_cpp(decoder)

    assert len(python) == len(cpp) == 12
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(cpp, python, strict=True))
    assert all(torch.isfinite(step).all() for step in cpp)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_layers_step_in_cpp_bitwise_as_in_python(demo_model_dir: Path, quantization: Any) -> None:
    cpp_engine = Engine(make_settings())
    python_engine = Engine(make_settings(native_step="false"))
    loaded, _ = cpp_engine.load(str(demo_model_dir), quantization)
    in_python, _ = python_engine.load(str(demo_model_dir), quantization)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)

    assert loaded.decoder is not None and loaded.decoder.native is not None
    assert loaded.decoder_reason.startswith(f"ours: a llama model on CPU (int{quantization[0]} matmuls")
    assert "; layers stepped in C++)" in loaded.decoder_reason
    assert in_python.decoder is not None and in_python.decoder.native is None
    assert "; layers stepped in Python: NATIVE_STEP=false)" in in_python.decoder_reason
    python, cpp = in_python_and_in_cpp(loaded.decoder)
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(cpp, python, strict=True))
    prompt = "The quick brown fox"
    assert (
        cpp_engine.generate(prompt, greedy).continuations
        == python_engine.generate(prompt, greedy).continuations
    )


@pytest.fixture
def build_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`native` looking for its build in an empty directory; its cached load forgotten before and after."""
    monkeypatch.setattr(native, "BUILD_DIRECTORY", tmp_path)
    monkeypatch.setattr(native, "STAMP", tmp_path / "stamp.json")
    native.load.cache_clear()
    yield tmp_path
    native.load.cache_clear()


def test_a_missing_or_stale_build_leaves_the_python_loop_and_says_why(build_directory: Path) -> None:
    decoder = Decoder(fused_copy(tiny("llama", torch.bfloat16)))
    fix = "build it: python -m function build-native"

    assert native_choice(decoder, "auto") == (
        None,
        f"layers stepped in Python: the C++ step is not built ({fix})",
    )
    (build_directory / f"{native.MODULE_NAME}.so").write_bytes(b"")
    (build_directory / "stamp.json").write_text(json.dumps({"torch": "2.0.0", "source": "0"}))
    native.load.cache_clear()
    assert native_choice(decoder, "auto") == (
        None,
        "layers stepped in Python: the C++ step is built for torch 2.0.0, "
        f"not this torch {torch.__version__} ({fix})",
    )
    (build_directory / "stamp.json").write_text(json.dumps({"torch": torch.__version__, "source": "0"}))
    native.load.cache_clear()
    assert (
        native_choice(decoder, "auto")[1]
        == f"layers stepped in Python: the C++ step is older than native_step.cpp ({fix})"
    )
    (build_directory / "stamp.json").write_text(json.dumps(native._stamp()))  # current, but no library
    native.load.cache_clear()
    layers, reason = native_choice(decoder, "auto")
    assert layers is None and reason.startswith("layers stepped in Python: the C++ step is not loadable: ")


def test_native_step_false_keeps_the_python_loop() -> None:
    decoder = Decoder(fused_copy(tiny("llama", torch.bfloat16)))

    assert native_choice(decoder, "false") == (None, "layers stepped in Python: NATIVE_STEP=false")


def test_build_native_is_quick_and_says_so_when_the_build_is_current(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["build-native"]) == 0

    assert capsys.readouterr().out == f"C++ step ready: {native.BUILD_DIRECTORY / native.MODULE_NAME}.so\n"
