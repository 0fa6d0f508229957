"""Settings: environment, .env file, precedence and validation."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from function.config import Settings


def test_defaults() -> None:
    settings = Settings(_env_file=None)  # type: ignore[call-arg]

    assert settings.model_path is None
    assert not settings.load_in_8bit and not settings.load_in_4bit
    assert "### Instruction:" in settings.instruction_template


def test_the_guides_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODEL_PATH", "outputs/checkpoints/final_model")
    monkeypatch.setenv("LOAD_IN_8BIT", "true")
    monkeypatch.setenv("MAX_NEW_TOKENS", "77")

    settings = Settings(_env_file=None)  # type: ignore[call-arg]

    assert settings.model_path == "outputs/checkpoints/final_model"
    assert settings.load_in_8bit is True
    assert settings.max_new_tokens == 77


def test_dotenv_file_is_read_and_the_environment_beats_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / ".env").write_text(
        "MODEL_PATH=outputs/checkpoints/final_model\nLOAD_IN_8BIT=false\nLOAD_IN_4BIT=true\n",
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)

    from_file = Settings()
    monkeypatch.setenv("MODEL_PATH", "/from/environment")
    overridden = Settings()
    explicit = Settings(model_path="/explicit")

    assert from_file.model_path == "outputs/checkpoints/final_model" and from_file.load_in_4bit is True
    assert overridden.model_path == "/from/environment"
    assert explicit.model_path == "/explicit"


def test_both_quantizations_are_refused() -> None:
    with pytest.raises(ValidationError, match="exclusive"):
        Settings(_env_file=None, load_in_8bit=True, load_in_4bit=True)  # type: ignore[call-arg]


def test_templates_need_their_placeholders() -> None:
    with pytest.raises(ValidationError, match="instruction"):
        Settings(_env_file=None, instruction_template="no placeholder")  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="input"):
        Settings(_env_file=None, instruction_input_template="{instruction} only")  # type: ignore[call-arg]


def test_batching_settings_from_the_environment_and_their_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BATCH_MAX_SIZE", "16")
    monkeypatch.setenv("BATCH_WINDOW_MS", "25")
    monkeypatch.setenv("BATCH_REDUCED_PRECISION", "true")
    monkeypatch.setenv("TORCH_COMPILE", "true")
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (settings.batch_max_size, settings.batch_window_ms) == (16, 25.0)
    assert settings.batch_reduced_precision and settings.torch_compile

    monkeypatch.setenv("BATCH_WINDOW_MS", "5000")
    with pytest.raises(ValidationError, match="batch_window_ms"):
        Settings(_env_file=None)  # type: ignore[call-arg]
    monkeypatch.setenv("BATCH_WINDOW_MS", "10")
    monkeypatch.setenv("BATCH_MAX_SIZE", "0")
    with pytest.raises(ValidationError, match="batch_max_size"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_decoder_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings(_env_file=None).decoder == "auto"  # type: ignore[call-arg]
    monkeypatch.setenv("DECODER", "transformers")
    assert Settings(_env_file=None).decoder == "transformers"  # type: ignore[call-arg]
    monkeypatch.setenv("DECODER", "fast")
    with pytest.raises(ValidationError, match="decoder"):
        Settings(_env_file=None)  # type: ignore[call-arg]


def test_the_admission_limit_defaults_to_four_batches_and_at_least_32() -> None:
    assert Settings(_env_file=None, batch_max_size=8).queue_limit == 32  # type: ignore[call-arg]
    assert Settings(_env_file=None, batch_max_size=16).queue_limit == 64  # type: ignore[call-arg]
    # micro-batching off must not shed ordinary concurrency: 4 x 1 would refuse a fifth client
    assert Settings(_env_file=None, batch_max_size=1).queue_limit == 32  # type: ignore[call-arg]
    assert Settings(_env_file=None, batch_max_size=1, max_queued_requests=2).queue_limit == 2  # type: ignore[call-arg]
