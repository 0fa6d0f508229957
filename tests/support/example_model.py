"""The built-in real model (SmolLM2-135M-Instruct), prepared once the way a user prepares it:
`python -m function example-model DIR`. Reused from `.example-model/` (what `make serve` builds)
or EXAMPLE_MODEL_DIR when complete there."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.support.servers import REPO


def example_model_dir() -> Path:
    target = Path(os.environ.get("EXAMPLE_MODEL_DIR") or REPO / ".example-model")
    if not ((target / "config.json").is_file() and (target / "model.safetensors").is_file()):
        subprocess.run(
            [sys.executable, "-m", "function", "example-model", str(target)],
            cwd=REPO,
            check=True,
            timeout=900,
        )
    return target
