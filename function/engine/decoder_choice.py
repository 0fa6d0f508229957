"""Which decoder runs a loaded model: ours (function.engine.decoder) where it can, else transformers'
`generate`, with the reason /model_info shows; and preparing the model for ours (`fuse_model`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import torch

from function.engine import native
from function.engine.calibration import calibrate
from function.engine.decoder import Decoder
from function.engine.kv_cache import BLOCK
from function.engine.projections import (
    Int4Projection,
    Int8Projection,
    PackedProjection,
    fusable,
    fuse_into,
    kept_spans,
    plain_weights,
    release_pages,
)
from function.weights.cpu import DECODER_MODEL_TYPES
from function.weights.memory import memory_available

if TYPE_CHECKING:
    from function.config import Settings
    from function.engine.types import Quantization
    from function.weights.loading import LoadedModel

logger = logging.getLogger(__name__)

# Same layer layout: RMSNorm, q/k/v/o projections (qwen2: with biases), RoPE, gated SiLU MLP. Kept
# with the CPU dtype rule, which picks the dtype around quantized layers for the decoder that runs them.
MODEL_TYPES = DECODER_MODEL_TYPES
KERNELS = {PackedProjection: "oneDNN-packed", Int8Projection: "int8", Int4Projection: "int4"}


def unsupported_reason(model: Any) -> str | None:
    """Why `Decoder` can't run this model, or None when it can."""
    config = model.config
    if config.model_type not in MODEL_TYPES:
        return f"model type {config.model_type!r} (ours covers {', '.join(MODEL_TYPES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r}"
    rope_type = str(getattr(getattr(getattr(model, "model", None), "rotary_emb", None), "rope_type", ""))
    if "dynamic" in rope_type or rope_type == "longrope":  # their frequencies change with the length
        return f"RoPE type {rope_type!r}"
    if getattr(config, "partial_rotary_factor", 1.0) != 1.0:
        return "partial RoPE"
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return "sliding-window attention"
    if getattr(config, "pretraining_tp", 1) != 1:
        return "pretraining_tp"
    body = getattr(model, "model", None)
    if body is None or not all(hasattr(body, name) for name in ("layers", "rotary_emb", "embed_tokens")):
        return "an unexpected module layout"
    if not hasattr(model, "lm_head"):
        return "an unexpected module layout"
    for layer in body.layers:
        attention, mlp = layer.self_attn, layer.mlp
        groups: list[tuple[Any, ...]] = [
            (attention.q_proj, attention.k_proj, attention.v_proj),
            (attention.o_proj,),
            (mlp.gate_proj, mlp.up_proj),
            (mlp.down_proj,),
        ]
        if not all(fusable(group) for group in groups):
            kinds = sorted({type(linear).__name__ for group in groups for linear in group})
            return f"linear layers of kinds {', '.join(kinds)}"
    if not tied_output(model) and not fusable((model.lm_head,)):
        return f"an output layer of kind {type(model.lm_head).__name__}"
    return None


def tied_output(model: Any) -> bool:
    """Whether the output layer's weight is the input embedding's (SmolLM2, Llama-3.2-1B, Qwen2.5-0.5B)."""
    return model.lm_head.weight is model.model.embed_tokens.weight


def fuse_model(model: Any, *, pack_tied_output: bool = False) -> None:
    """Fuse and pack every layer's projections in place (`unsupported_reason` must be None).

    A tied output layer stays as it is unless `pack_tied_output`: packing it holds the embedding
    twice (SmolLM2-135M: +56 MB, Llama-3.2-1B: +525 MB) for a 1.1-1.2x faster batch-1 step here
    (docs/benchmarks.md; `tied_output_choice`). The pages of the weights replaced are given back at
    once (`release_pages`): they may be views of a file mapping or of the weights-in-memory buffers,
    which the remaining views keep mapped."""
    groups: list[tuple[Any, tuple[str, ...]]] = []
    for layer in model.model.layers:
        groups += [
            (layer.self_attn, ("q_proj", "k_proj", "v_proj")),
            (layer.self_attn, ("o_proj",)),
            (layer.mlp, ("gate_proj", "up_proj")),
            (layer.mlp, ("down_proj",)),
        ]
    if not tied_output(model):
        groups.append((model, ("lm_head",)))
    # Each group's pages go back as soon as it is fused, so the peak holds one group twice, not the
    # model (WEIGHTS_IN_MEMORY's INIT measured 2.0x the weights above its imports when released at the end).
    replaced_ids = {
        id(t) for parent, names in groups for name in names for t in getattr(parent, name).parameters()
    }
    kept = kept_spans(t for t in (*model.parameters(), *model.buffers()) if id(t) not in replaced_ids)
    tied = tied_output(model)
    for parent, names in groups:
        replaced = plain_weights(getattr(parent, name) for name in names)
        fuse_into(parent, names)
        release_pages(replaced, kept)
        del replaced
    if tied and pack_tied_output:  # a packed copy; the embedding keeps the weight and its pages
        fuse_into(model, ("lm_head",))


def tied_output_choice(model: Any, setting: str, *, on_lambda: bool) -> tuple[bool, str]:
    """Whether `fuse_model` packs a tied output layer (PACK_TIED_OUTPUT), and the reason's words."""
    if not tied_output(model) or not fusable((model.lm_head,)):
        return False, ""
    weight = model.lm_head.weight
    megabytes = weight.numel() * weight.element_size() / 2**20
    if setting != "auto":
        packed = setting == "true"
        return packed, f"tied output layer {'packed' if packed else 'shared'}: PACK_TIED_OUTPUT={setting}"
    if on_lambda:
        return False, "tied output layer shared: on Lambda, packing it would raise the INIT's memory peak"
    available = memory_available()
    if available is None:
        return False, "tied output layer shared: the memory available is unknown"
    if 4 * megabytes * 2**20 > available:
        return (
            False,
            f"tied output layer shared: its {megabytes:,.0f} MB copy is over a quarter of the "
            f"{available / 2**20:,.0f} MB available",
        )
    return (
        True,
        f"tied output layer packed too (+{megabytes:,.0f} MB; {available / 2**20:,.0f} MB were available)",
    )


def attach_decoder(
    loaded: LoadedModel,
    setting: str,
    *,
    compiled: bool,
    batch_rows: int | None = None,
    pack_tied: str = "false",
    on_lambda: bool = False,
    native_step: str = "auto",
    batching: bool = True,
    lookup_tokens: int = 0,
) -> LoadedModel:
    """`loaded` with our decoder when it can run the model (its linear layers packed in place), else
    as it was; either way with the reason /model_info shows. Never fails a load: a model ours can't
    take decodes with transformers. `batch_rows`: the most rows a step runs (the micro-batcher's
    largest batch, or a row and its drafts), to `calibrate` exact rows for (None or 1: nothing to
    measure, or float32's batches, which need no measuring). `pack_tied`:
    PACK_TIED_OUTPUT (`tied_output_choice`). `native_step`: NATIVE_STEP (`native_choice`); `batching`:
    a micro-batcher serves it (the reason's words). `lookup_tokens`: PROMPT_LOOKUP_TOKENS, kept where
    the rows of a step decode bitwise as alone, measured or by construction (`_exact_rows`;
    function.engine.speculation)."""
    reason = _transformers_reason(loaded, setting, compiled=compiled)
    if reason is not None:
        return replace(loaded, decoder=None, decoder_reason=f"transformers: {reason}")
    packed, tied = tied_output_choice(loaded.model, pack_tied, on_lambda=on_lambda)
    fuse_model(loaded.model, pack_tied_output=packed)
    decoder = Decoder(loaded.model)
    decoder.native, loop = native_choice(decoder, native_step)
    kernels = KERNELS[type(decoder.layers[0].o)] if decoder.layers else "no"
    logger.info("decoder: ours (%s matmuls; %s)", kernels, loop)
    reason = (
        f"ours: a {loaded.model.config.model_type} model on CPU ({kernels} matmuls, q/k/v and gate/up fused"
        + (f"; {tied}" if tied else "")
        + f"; {loop})"
    )
    if batch_rows is not None and batch_rows > 1:
        reason += _exact_rows(decoder, batch_rows, batching=batching)
        decoder.lookup_tokens = lookup_tokens if decoder.batch_exact else 0
        logger.info("decoder: %s", reason)
    reason += _lookup_words(decoder, lookup_tokens)
    return replace(loaded, decoder=decoder, decoder_reason=reason)


def _exact_rows(decoder: Decoder, rows: int, *, batching: bool) -> str:
    """Whether a step's rows (up to `rows`: a batch's, or a row and its drafts) decode bitwise as
    alone, `decoder.batch_exact`: by construction where every matmul is our own (`rows_alike`), else
    measured (`calibrate`: 0.17-0.5 s on the example model for 4 rows, int4 to bf16); the reason's words."""
    subject = "batched rows" if batching else "the rows of a step"
    if decoder.rows_alike:  # each output adds its pairs in one order, whatever the rows (tested)
        decoder.batch_exact = True
        return f"; {subject} decode bitwise as alone (our own matmuls: by construction)"
    with torch.inference_mode():
        exact = calibrate(decoder, rows)
    if not batching:  # a step's rows are one row and its drafts, each attending alone: no blocks
        decoder.block_spans = False
    if not exact:
        return f"; {subject} do not decode bitwise as alone here (measured)" + (
            ": greedy requests run alone" if batching else ""
        )
    padded = sum(1 for least in decoder.least_rows.values() if least > 1)
    attention = (
        "each row attends to its own keys, in C++"
        if decoder.native is not None
        else f"the rows of a {BLOCK}-column block attend in one call"
        if decoder.attend_runs
        else "rows attend one at a time"
    )
    return (
        f"; {subject} decode bitwise as alone (measured; {padded} matmuls take 2 rows at least; {attention})"
    )


def _lookup_words(decoder: Decoder, setting: int) -> str:
    if decoder.lookup_tokens:
        return (
            f"; greedy requests draft up to {decoder.lookup_tokens} tokens a step from their own text "
            "and check them in one step (PROMPT_LOOKUP_TOKENS)"
        )
    if setting:
        return "; no drafts (PROMPT_LOOKUP_TOKENS): the rows of a step were not measured bitwise as alone"
    return ""


def native_choice(decoder: Decoder, setting: str) -> tuple[Any, str]:
    """The C++ layer loop for `decoder` (function.engine.native) where NATIVE_STEP allows and it is
    built, else None; and the reason's words. Its bf16 matmuls, and the output layer's, go to our own
    kernel where it reads their weights (`native.native_layers`, `native.native_head`): faster than
    oneDNN's for a row and for a batch's 8, and each row's products alike in a call of any rows."""
    if setting == "false":
        return None, "layers stepped in Python: NATIVE_STEP=false"
    layers, words, all_own = native.native_layers(decoder)
    if layers is None:
        return None, f"layers stepped in Python: the C++ step {words}"
    decoder.native_head = native.native_head(decoder)
    decoder.rows_alike = all_own and decoder.native_head is not None
    head = "; the output layer's too" if decoder.native_head is not None else ""
    return layers, f"layers stepped in C++{words}{head}"


def _transformers_reason(loaded: LoadedModel, setting: str, *, compiled: bool) -> str | None:
    if setting == "transformers":
        return "DECODER=transformers"
    if compiled:
        return "TORCH_COMPILE decodes with transformers' static cache"
    if loaded.device != "cpu":
        return f"ours runs on CPU, this model is on {loaded.device}"
    if loaded.adapters or (loaded.adapter is not None and not loaded.adapter_merged):
        return "adapters are applied by PEFT's layers"
    return unsupported_reason(loaded.model)


def load_with_decoder(
    model_path: str,
    quantization: Quantization,
    settings: Settings,
    device: str,
    *,
    compiled: bool,
    batching: bool,
    base_model_path: str | None,
    adapters: dict[str, str] | None,
    check_path: Callable[[str], None] | None,
) -> LoadedModel:
    """The engine's load: the model (function.weights.loading), then our decoder where it can run it.
    `batching`: a micro-batcher will serve it, so exact batching is measured where the batcher would
    otherwise keep greedy requests apart (not in float32, which batches regardless)."""
    from function.engine.batching import float32_batching
    from function.weights.loading import load_model

    loaded = load_model(
        model_path,
        quantization,
        settings,
        device,
        base_model_path=base_model_path,
        adapters=adapters,
        check_path=check_path,
    )
    if batching and float32_batching(loaded):
        rows = None  # float32 batches regardless (batching.exact_batching), unmeasured: no drafts either
    else:  # a batch's rows, and a step's drafts (PROMPT_LOOKUP_TOKENS), decode as alone only if measured
        lookup = settings.prompt_lookup_tokens
        rows = max(settings.batch_max_size if batching else 1, lookup + 1 if lookup else 1)
    return attach_decoder(
        loaded,
        settings.decoder,
        compiled=compiled,
        batch_rows=rows,
        pack_tied=settings.pack_tied_output,
        on_lambda=settings.on_lambda,
        native_step=settings.native_step,
        batching=batching,
        lookup_tokens=settings.prompt_lookup_tokens,
    )
