"""TORCH_COMPILE: opt-in, server mode only, same greedy answers as eager decoding."""

from __future__ import annotations

from pathlib import Path

import pytest

from function.engine.engine import Engine
from function.engine.types import SamplingParams
from tests.support.settings import make_settings


@pytest.mark.slow
def test_compiled_decoding_answers_as_eager_does(demo_model_dir: Path) -> None:
    eager = Engine(make_settings(model_path=str(demo_model_dir)))
    compiled = Engine(make_settings(model_path=str(demo_model_dir), torch_compile=True))
    for engine in (eager, compiled):
        engine.load_startup_model()
    params = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.2)

    for prompt in ("Python이란", "The quick brown fox"):
        expected = eager.generate(prompt, params)
        got = compiled.generate(prompt, params)  # the first call compiles (seconds on a CPU)

        assert got.continuations == expected.continuations
        assert got.completion_tokens == expected.completion_tokens
    assert compiled.compiled and not eager.compiled
    # The forward really was compiled (transformers keeps the compiled callable on the model), and
    # the eager engine's was not: equal answers alone would not tell the two apart.
    assert compiled.current is not None and eager.current is not None
    assert hasattr(compiled.current.model, "_compiled_call")
    assert not hasattr(eager.current.model, "_compiled_call")


@pytest.mark.parametrize("initialization", [None, "on-demand", "snap-start"])
def test_compile_is_ignored_on_lambda_snapstart_included(
    demo_model_dir: Path, caplog: pytest.LogCaptureFixture, initialization: str | None
) -> None:
    # Under SnapStart too: the INIT's compile did not cover users' lengths (measured, README SnapStart)
    engine = Engine(
        make_settings(
            model_path=str(demo_model_dir),
            torch_compile=True,
            aws_lambda_function_name="fn",
            aws_lambda_initialization_type=initialization,
        )
    )

    assert not engine.compiled
    assert "TORCH_COMPILE is ignored on Lambda" in caplog.text
