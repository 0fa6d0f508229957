"""What config.json implies must be what the safetensors hold, checked before anything is allocated.

transformers initialises whatever the checkpoint lacks with random weights and serves it; a config
that claims a million layers allocates toward an out-of-memory kill. Both are refused here, from the
safetensors headers (no weights are read) and a skeleton of the model on the meta device (no
memory): first the parameter cap, the context cap and the layer count, which the headers alone
settle, then every tensor's name and shape.
"""

from __future__ import annotations

import copy
import json
import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from function.config import Settings
from function.errors import ModelLoadError

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONTEXT_ATTRIBUTES = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
SHOWN = 3  # tensors named per kind of mismatch; the count says how many there are
# One tensor of a layer stack: `model.layers.3.…`, `transformer.h.3.…`, `blocks.3.…`.
LAYER_NAME = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")
# Never weights: old checkpoints saved these buffers, which models now compute (transformers skips them too).
COMPUTED_BUFFERS = re.compile(r"rotary_emb\.inv_freq|(^|\.)position_ids$")


@dataclass(frozen=True)
class Checkpoint:
    """The names and shapes of a model's tensors, from the headers of the files from_pretrained reads."""

    shapes: dict[str, tuple[int, ...]]

    @property
    def parameters(self) -> int:
        return sum(math.prod(shape) for shape in self.shapes.values())

    def layer_count(self) -> int:
        """Layers of the largest stack (distinct `N` of `….layers.N.…`); 0 when no name looks like one."""
        stacks: dict[str, set[int]] = {}
        for name in self.shapes:
            match = LAYER_NAME.search(name)
            if match:  # the stack is what comes before its first index: `model`, `model.vision.encoder`
                stacks.setdefault(name[: match.start()], set()).add(int(match.group(1)))
        return max((len(indices) for indices in stacks.values()), default=0)


def weight_files(local_dir: Path) -> list[Path]:
    """The files from_pretrained reads: the shards the index names, else model.safetensors, else all."""
    index = local_dir / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = sorted({str(shard) for shard in weight_map.values()})
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ModelLoadError(
                f"the model's {WEIGHTS_INDEX_NAME} is not valid", field="model_path"
            ) from exc
        if any(Path(shard).name != shard for shard in shards):
            raise ModelLoadError(
                f"the model's {WEIGHTS_INDEX_NAME} names a shard outside the model directory",
                field="model_path",
            )
        return [local_dir / shard for shard in shards if (local_dir / shard).is_file()]
    if (local_dir / WEIGHTS_NAME).is_file():
        return [local_dir / WEIGHTS_NAME]
    return sorted(local_dir.glob("*.safetensors"))


def read_checkpoint(local_dir: Path) -> Checkpoint:
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for path in weight_files(local_dir):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open has no __iter__)
                shapes[key] = tuple(handle.get_slice(key).get_shape())
    return Checkpoint(shapes)


def count_checkpoint_parameters(local_dir: Path) -> int:
    """Parameters in the safetensors files, from their headers (no weights are read)."""
    return read_checkpoint(local_dir).parameters


def config_context_length(config: Any, settings: Settings) -> int | None:
    """The context the config claims; one above MAX_CONTEXT_LENGTH is refused (it would switch the context
    check off)."""
    for attribute in CONTEXT_ATTRIBUTES:
        value = getattr(config, attribute, None)
        if isinstance(value, int) and value > 0:
            if value > settings.max_context_length:
                raise ModelLoadError(
                    f"config.json's {attribute} is {value}, above MAX_CONTEXT_LENGTH "
                    f"({settings.max_context_length}); raise the cap if the model really takes that much",
                    field="model_path",
                    limit=settings.max_context_length,
                )
            return value
    return None


def check_checkpoint(config: Any, checkpoint: Checkpoint, settings: Settings) -> None:
    """Refuse a checkpoint over the caps, or one that does not hold what its config describes."""
    if checkpoint.parameters > settings.max_model_parameters:
        raise ModelLoadError(
            f"the checkpoint holds {checkpoint.parameters:,} parameters, above MAX_MODEL_PARAMETERS "
            f"({settings.max_model_parameters:,})",
            field="model_path",
            limit=settings.max_model_parameters,
        )
    config_context_length(config, settings)
    _check_layer_count(config, checkpoint)
    if getattr(config, "quantization_config", None) is None:
        # A pre-quantized checkpoint stores packed tensors under other names: its load's report is the check.
        _check_tensors(config, checkpoint)


def _check_layer_count(config: Any, checkpoint: Checkpoint) -> None:
    """Settled from the header names alone, before a skeleton of the claimed layers is built."""
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) and hasattr(config, "get_text_config"):
        layers = getattr(config.get_text_config(), "num_hidden_layers", None)
    if not isinstance(layers, int):
        return
    held = checkpoint.layer_count()
    # Every layer has a tensor: without names that show the layers, the tensor count still bounds them.
    if layers > (held or len(checkpoint.shapes)):
        holds = f"holds {held} layers" if held else f"holds only {len(checkpoint.shapes)} tensors"
        raise ModelLoadError(
            f"config.json's num_hidden_layers is {layers} but the checkpoint {holds}: the layers it lacks "
            "would be served as random weights",
            field="model_path",
        )


def _check_tensors(config: Any, checkpoint: Checkpoint) -> None:
    model = _skeleton(config)
    rename = _renamer(model)
    loaded: dict[str, str] = {}  # the model's name -> the checkpoint's
    for name in checkpoint.shapes:
        target = rename(name)
        if target is None:  # merged or split at load: the load's own report is the check
            return
        loaded[target] = name
    expected = {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}
    parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    ignore_missing = _patterns(getattr(model, "_keys_to_ignore_on_load_missing", None))
    ignore_unexpected = _patterns(getattr(model, "_keys_to_ignore_on_load_unexpected", None))
    tied = _tied_groups(getattr(model, "all_tied_weights_keys", None) or {})
    missing = [
        name
        for name in parameters
        if name not in loaded
        and not any(other in loaded for other in tied.get(name, ()))
        and not (ignore_missing and ignore_missing.search(name))
    ]
    unexpected = [
        source
        for target, source in loaded.items()
        if target not in expected
        and not COMPUTED_BUFFERS.search(target)
        and not (ignore_unexpected and ignore_unexpected.search(target))
    ]
    mismatched = [
        f"{source} {checkpoint.shapes[source]} where config.json needs {expected[target]}"
        for target, source in loaded.items()
        if target in expected and checkpoint.shapes[source] != expected[target]
    ]
    problem = describe_mismatch(missing, unexpected, mismatched)
    if problem:
        raise ModelLoadError(problem, field="model_path")


def describe_mismatch(
    missing: Iterable[str], unexpected: Iterable[str], mismatched: Iterable[str]
) -> str | None:
    parts = [
        _listed(missing, "is missing", "are missing", " (they would be served as random weights)"),
        _listed(unexpected, "is unexpected", "are unexpected", " (config.json describes no such tensors)"),
        _listed(mismatched, "has another shape", "have other shapes", ""),
    ]
    found = [part for part in parts if part]
    return "the checkpoint does not match config.json: " + "; ".join(found) if found else None


def loading_problem(info: Mapping[str, Any]) -> str | None:
    """What from_pretrained reported missing or mis-shaped (`output_loading_info`), as a refusal; None when
    every tensor was loaded."""
    mismatched = [
        str(item[0]) if isinstance(item, tuple) else str(item) for item in info.get("mismatched_keys", ())
    ]
    return describe_mismatch(info.get("missing_keys", ()), (), mismatched)


def _listed(names: Iterable[str], one: str, many: str, why: str) -> str:
    ordered = sorted(names)
    if not ordered:
        return ""
    shown = ", ".join(ordered[:SHOWN]) + (f" and {len(ordered) - SHOWN} more" if len(ordered) > SHOWN else "")
    return (
        f"1 tensor {one}{why}: {shown}"
        if len(ordered) == 1
        else f"{len(ordered)} tensors {many}{why}: {shown}"
    )


def _skeleton(config: Any) -> Any:
    """The model the config describes, on the meta device: names and shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_config(copy.deepcopy(config))


def _renamer(model: Any) -> Callable[[str], str | None]:
    """A checkpoint name as transformers loads it (legacy renames, the base model's prefix added or
    dropped); None for a tensor it merges or splits at load."""
    meta = model.state_dict()
    prefix = str(getattr(model, "base_model_prefix", "") or "")
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, rename_source_key

        transforms = list(get_model_conversion_mapping(model))
    except (ImportError, AttributeError, TypeError):  # internals of transformers 5; older: names as they are
        return lambda name: _with_prefix(name, prefix, meta)
    renamings: list[Any] = [t for t in transforms if not isinstance(t, WeightConverter)]
    converters: list[Any] = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(name: str) -> str | None:
        renamed, converted = rename_source_key(name, renamings, converters, prefix or None, meta)
        return None if converted is not None else str(renamed)

    return rename


def _with_prefix(name: str, prefix: str, meta: Mapping[str, Any]) -> str:
    if not prefix or name in meta:
        return name
    if name.startswith(prefix + ".") and name[len(prefix) + 1 :] in meta:
        return name[len(prefix) + 1 :]
    return f"{prefix}.{name}" if f"{prefix}.{name}" in meta else name


def _tied_groups(tied: Mapping[str, str]) -> dict[str, set[str]]:
    """Each tied tensor with the ones it shares storage with: any one of them in the checkpoint loads all."""
    groups: dict[str, set[str]] = {}
    for target, source in tied.items():
        groups.setdefault(target, set()).add(source)
        groups.setdefault(source, set()).add(target)
    return groups


def _patterns(patterns: Iterable[str] | None) -> re.Pattern[str] | None:
    listed = list(patterns or ())
    return re.compile("|".join(f"({pattern})" for pattern in listed)) if listed else None
