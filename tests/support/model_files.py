"""Model directories whose files lie: a config that claims more than its checkpoint, a checkpoint with
tensors taken out, weights that are a link to somewhere else."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def copy_model(source: Path, destination: Path, **config_changes: Any) -> Path:
    """A copy of `source` whose config.json has `config_changes` applied (`num_hidden_layers=3`, say)."""
    shutil.copytree(source, destination)
    if config_changes:
        config_path = destination / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8"))
        config.update(config_changes)
        config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return destination


def drop_tensors(model_dir: Path, *names: str) -> None:
    """Rewrite the model's model.safetensors without the named tensors."""
    from safetensors.torch import load_file, save_file

    weights = model_dir / "model.safetensors"
    tensors = load_file(str(weights))
    for name in names:
        del tensors[name]
    save_file(tensors, str(weights), metadata={"format": "pt"})
