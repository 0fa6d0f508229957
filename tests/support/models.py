"""Model directories the demo-model fixtures don't build: hostile checkpoints."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any


class _WritesMarker:
    """Unpickling this runs `touch marker`: the payload a hostile checkpoint would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def write_pickle_only_model(directory: Path, marker: Path) -> Path:
    """A model directory whose only weights are a pickle that creates `marker` if anything unpickles it."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps({"model_type": "llama"}), encoding="utf-8")
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_WritesMarker(marker)))
    return directory
