"""Our decoder's decode step in C++ (`native_step.cpp`): built once, ahead of time, loaded if current.

The Python step of a small model is ~35 ATen calls a layer, each with the interpreter, argument
parsing, dispatch and an allocation: ~1,000 a step, about a fifth of a bfloat16 step and two fifths
of an int4 one on SmolLM2-135M. The C++ step makes the same matmul calls and does everything between
them in loops of its own, a row at a time (RMSNorm, RoPE and the cache writes, attention over the
row's own keys, SiLU, the residual adds), without the GIL. Measured side by side on SmolLM2-135M,
2 cores (docs/benchmarks.md): 1.36x a bfloat16 step, 1.54x an int8 one, 1.81x an int4 one, 1.26x an
8-row batch. Prompts of up to `decoder.NATIVE_PROMPT_TOKENS` prefill through it too. Its logits are
not bitwise the Python step's (another order of additions: within bfloat16's rounding, and equal
greedy tokens in float32, tested), but each row's are bitwise the same in any batch, since no loop
mixes rows. Its bf16 matmuls, the output layer's too, are our own where the CPU has AVX-512 BF16
(`native_matmul.h`, `native_layers`, `native_head`): faster than oneDNN's for one row and for a
batch's eight, and each row's products alike in a call of any rows, so that a step's rows decode
bitwise as alone by construction.

It is built with PyTorch's extension builder (gcc and ninja) by `python -m function build-native`
(`make native`, which `make test` needs and `make serve` tries; the Dockerfile builds it in a stage
of its own), into `_native/` beside this file, with a stamp of the torch version, the Python ABI and
machine, and the sources' hash. It
is never compiled at run time: on Lambda that would land on the cold path, and the image has no
compiler. Where it is missing, stale or fails to load, the decoder steps in Python and /model_info's
decoder_reason says why (`NATIVE_STEP`).
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import platform
import shutil
import sysconfig
import threading
from functools import cache, partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from function.engine.projections import Int4Projection, Int8Projection, PackedProjection, Projection

SOURCE = Path(__file__).with_name("native_step.cpp")
# what a build is compiled from
SOURCES = (SOURCE, *(Path(__file__).with_name(header) for header in ("native_loops.h", "native_matmul.h")))
BUILD_DIRECTORY = Path(__file__).with_name("_native")
MODULE_NAME = "llm_function_native_step"
STAMP = BUILD_DIRECTORY / "stamp.json"
REBUILD = "build it: python -m function build-native"
PACKED, INT8, INT4 = 0, 1, 2  # native_step.cpp's `Kind`
ACTIVATION_DTYPES = (torch.bfloat16, torch.float32)  # its loops' element types

# OpenMP: at::parallel_for in our sources (ATen/ParallelOpenMP.h) runs on torch's intra-op threads
# only where the extension is compiled with it; without, every loop and matmul of ours ran on one
# thread (our own matmul, the attention).
CFLAGS = ("-O3", "-fopenmp")
LDFLAGS = ("-fopenmp",)

_build_lock = threading.Lock()


def _stamp() -> dict[str, str]:
    """What a build is valid for: this torch, this Python's extension ABI and machine, these sources
    and flags."""
    flags = " ".join((*CFLAGS, *LDFLAGS)).encode()
    digest = hashlib.sha256(b"".join(source.read_bytes() for source in SOURCES) + flags).hexdigest()
    abi = f"{sysconfig.get_config_var('SOABI')} {platform.machine()}"
    return {"torch": torch.__version__, "python": abi, "source": digest}


def _read_stamp() -> dict[str, str] | None:
    try:
        stamp = json.loads(STAMP.read_text())
    except (OSError, ValueError):  # missing, unreadable, or cut short
        return None
    return stamp if isinstance(stamp, dict) else None


def build(verbose: bool = False) -> Path:
    """Compile `native_step.cpp` (with its headers) into `BUILD_DIRECTORY` (PyTorch's extension
    builder: gcc and ninja; half a minute on 2 cores, nothing when the stamp is current) and return
    the library's path."""
    from torch.utils import cpp_extension

    with _build_lock:
        if _read_stamp() == _stamp() and _library().exists() and load()[0] is not None:
            return _library()
        # From scratch: ninja would call a library built against another torch's headers current.
        shutil.rmtree(BUILD_DIRECTORY, ignore_errors=True)
        BUILD_DIRECTORY.mkdir()
        cpp_extension.load(
            MODULE_NAME,
            [str(SOURCE)],
            build_directory=str(BUILD_DIRECTORY),
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            verbose=verbose,
        )
        STAMP.write_text(json.dumps(_stamp()))
        load.cache_clear()
        return _library()


def _library() -> Path:
    return BUILD_DIRECTORY / f"{MODULE_NAME}.so"


@cache
def load() -> tuple[Any, str]:
    """The built module and "" where it is current and loads; else None and why not, worded to
    follow "the C++ step is". Never raises: a load falls back to the Python step."""
    try:
        return _load()
    except OSError as error:  # a source missing from an install, an unreadable build
        return None, f"not loadable: {error}"


def _load() -> tuple[Any, str]:
    stamp = _read_stamp()
    if not _library().exists() or stamp is None:
        return None, f"not built ({REBUILD})"
    if stamp.get("torch") != torch.__version__:
        return None, f"built for torch {stamp.get('torch')}, not this torch {torch.__version__} ({REBUILD})"
    if stamp != _stamp():
        return None, f"built for another Python or older than its sources ({REBUILD})"
    spec = importlib.util.spec_from_file_location(
        MODULE_NAME, _library(), loader=importlib.machinery.ExtensionFileLoader(MODULE_NAME, str(_library()))
    )
    if spec is None or spec.loader is None:
        return None, f"not loadable from {_library().name}"
    try:
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    except ImportError as error:  # a library built against another libtorch or libstdc++
        return None, f"not loadable: {error}"
    return module, ""


def native_layers(decoder: Any, *, own_matmuls: bool = True) -> tuple[Any, str, bool]:
    """The C++ `Layers` over `decoder`'s weights (shared, not copied) and what it runs its matmuls
    on (worded to follow "layers stepped in C++"); or None and why it can't run them (worded to
    follow "the C++ step"); and whether every matmul is our own. `own_matmuls`: the bf16 projections
    our own matmul can read go to it (native_matmul.h: faster than oneDNN's for 1 to 8 rows on the
    example model, docs/benchmarks.md); False: oneDNN's (tests, benchmarks)."""
    module, why_not = load()
    if module is None:
        return None, f"is {why_not}", False
    if decoder.dtype not in ACTIVATION_DTYPES:
        dtype = str(decoder.dtype).removeprefix("torch.")
        return None, f"takes bfloat16 or float32 activations, not {dtype}", False
    projections = [
        [_projection(module, getattr(layer, name)) for layer in decoder.layers]
        for name in ("qkv", "o", "gate_up", "down")
    ]
    if not decoder.layers or any(projection is None for group in projections for projection in group):
        return None, "does not take these projections", False
    norms = [weight for layer in decoder.layers for weight in (layer.attention_norm, layer.mlp_norm)]
    if any(weight.dtype != decoder.dtype for weight in norms):
        return None, "takes norm weights of the activations' dtype", False
    width = decoder.hidden_size
    try:
        layers = module.Layers(
            [layer.attention_norm[:width] for layer in decoder.layers],  # `_doubled`'s first half
            [layer.mlp_norm[:width] for layer in decoder.layers],
            *projections,
            decoder.heads,
            decoder.kv_heads,
            decoder.head_dim,
            decoder.intermediate,
            float(decoder.eps),
        )
        own = layers.own_matmuls() if own_matmuls else 0
    except RuntimeError as error:  # shapes its checks refuse: the load goes on, in Python
        return None, f"does not take this model: {str(error).splitlines()[0]}", False
    total = 4 * len(decoder.layers)
    if not own:
        return layers, "", False
    rest = "" if own == total else ", the rest oneDNN's"
    return (
        layers,
        f", {own} of its {total} matmuls our own (AVX-512 BF16{rest})",
        own == total,
    )


def native_head(decoder: Any) -> Any:
    """Our matmul for the output layer, as `Decoder.native_head`, where this CPU has AVX-512 BF16:
    over oneDNN's packed copy (`own_matmul`, where it reads that layout: `own_matmul_agrees`), or
    over the weights as the model holds them (`own_plain_matmul`: a plain bf16 linear layer without
    bias, an output layer tied to the embeddings and not packed: PACK_TIED_OUTPUT, on Lambda).
    On the example model's, 1 / 8 rows: oneDNN packed 0.84 / 1.17 ms, ours packed 0.66 / 0.84, ours
    plain 0.78 / 1.89, PyTorch's plain 1.66 / 1.98 (docs/benchmarks.md). Else None."""
    module, _ = load()
    head = decoder.head
    if module is None or not module.own_matmul_supported():
        return None
    if isinstance(head, PackedProjection):
        if head.weight.dtype != torch.bfloat16 or not module.own_matmul_agrees(head.weight, head.bias):
            return None
        return partial(module.own_matmul, packed=head.weight, bias=head.bias)
    if type(head) is not nn.Linear or head.bias is not None:
        return None
    weight = head.weight.detach()
    rows, inputs = weight.shape
    if weight.dtype != torch.bfloat16 or not weight.is_contiguous() or inputs % 32 or rows % 4:
        return None
    return partial(module.own_plain_matmul, weight=weight)


def _projection(module: Any, projection: Projection) -> Any:
    if isinstance(projection, PackedProjection):
        return module.Projection(PACKED, projection.weight, projection.weight, projection.bias, 0, -1)
    if isinstance(projection, Int8Projection):
        return module.Projection(INT8, projection.codes, projection.scales, projection.bias, 0, -1)
    if isinstance(projection, Int4Projection):
        width = projection.sizes[0] if len(projection.sizes) == 1 else -1
        return module.Projection(
            INT4, projection.packed, projection.scale_and_zero, projection.bias, projection.group_size, width
        )
    return None
