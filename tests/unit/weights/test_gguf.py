"""GGUF files: what convert-gguf refuses before any work, and why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from function.errors import ModelLoadError
from function.weights.gguf import check_gguf, convert_gguf, supported_architectures


def write_gguf(path: Path, architecture: str) -> Path:
    """A small, valid GGUF file that declares `architecture` (one tensor, no model behind it)."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), architecture)
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_an_architecture_transformers_cannot_read_is_refused_by_name(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "model.gguf", "rwkv7")

    with pytest.raises(ModelLoadError) as refused:
        check_gguf(path)

    assert "'rwkv7'" in refused.value.message and "llama" in refused.value.message
    assert refused.value.field == "gguf_file"


def test_a_supported_architecture_passes_the_check(tmp_path: Path) -> None:
    assert check_gguf(write_gguf(tmp_path / "model.gguf", "llama")) == "llama"
    assert {"llama", "qwen2", "mistral"} <= set(supported_architectures())


def test_a_file_that_is_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 not a gguf file")

    with pytest.raises(ModelLoadError, match="not a GGUF file"):
        check_gguf(path)
    with pytest.raises(ModelLoadError, match="is not a file"):
        check_gguf(tmp_path / "missing.gguf")


def test_conversion_never_writes_into_a_non_empty_directory(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine", encoding="utf-8")

    with pytest.raises(ModelLoadError, match="not empty"):
        convert_gguf(write_gguf(tmp_path / "model.gguf", "llama"), out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_a_gguf_file_without_a_model_in_it_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"transformers could not read model\.gguf"):
        convert_gguf(write_gguf(tmp_path / "model.gguf", "llama"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
