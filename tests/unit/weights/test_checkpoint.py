"""Model files that lie: a config.json that claims what its checkpoint doesn't hold is refused before
anything is allocated, never served with random weights."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.engine.engine import Engine
from function.engine.types import Quantization
from function.errors import ModelLoadError
from function.weights.checkpoint import count_checkpoint_parameters, loading_problem, read_checkpoint
from tests.support.model_files import copy_model, drop_tensors
from tests.support.settings import make_settings


def load_error(model_dir: Path, quantization: Quantization = "none", **settings: Any) -> ModelLoadError:
    engine = Engine(make_settings(**settings))
    with pytest.raises(ModelLoadError) as error:
        engine.load(str(model_dir), quantization)
    assert engine.current is None
    return error.value


def test_parameters_are_counted_from_safetensors_headers(demo_model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, local_files_only=True)

    assert count_checkpoint_parameters(demo_model_dir) == sum(p.numel() for p in model.parameters())
    assert read_checkpoint(demo_model_dir).layer_count() == 2


def test_a_config_with_more_layers_than_its_checkpoint_is_refused(
    demo_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN a 2-layer checkpoint whose config.json says 3 layers (transformers would initialise the third)
    model_dir = copy_model(demo_model_dir, tmp_path / "three_layers", num_hidden_layers=3)

    # WHEN it is loaded THEN it is refused, naming the layer counts
    message = load_error(model_dir).message
    assert "num_hidden_layers is 3" in message and "holds 2 layers" in message


def test_a_million_layers_is_refused_from_the_headers(demo_model_dir: Path, tmp_path: Path) -> None:
    # GIVEN a config claiming 10^6 layers (building even a skeleton of them would take minutes)
    model_dir = copy_model(demo_model_dir, tmp_path / "million", num_hidden_layers=10**6)

    # WHEN it is loaded THEN the headers alone refuse it
    message = load_error(model_dir).message
    assert "num_hidden_layers is 1000000" in message and "holds 2 layers" in message


@pytest.mark.parametrize("quantization", ["none", "8bit"])
def test_missing_tensors_are_named_and_counted(
    demo_model_dir: Path, tmp_path: Path, quantization: Quantization
) -> None:
    # GIVEN a checkpoint with the output head and one layer's projections taken out
    model_dir = copy_model(demo_model_dir, tmp_path / "holes")
    drop_tensors(
        model_dir,
        "lm_head.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.1.mlp.gate_proj.weight",
        "model.layers.1.mlp.up_proj.weight",
    )

    # WHEN it is loaded, quantized or not (the check reads the unquantized names and shapes)
    message = load_error(model_dir, quantization).message

    # THEN the missing tensors are counted and the first few named
    assert "4 tensors are missing" in message
    assert "lm_head.weight" in message and "model.layers.1.mlp.down_proj.weight" in message
    assert "and 1 more" in message


def test_a_config_with_fewer_layers_leaves_tensors_unexpected(demo_model_dir: Path, tmp_path: Path) -> None:
    model_dir = copy_model(demo_model_dir, tmp_path / "one_layer", num_hidden_layers=1)

    message = load_error(model_dir).message

    assert "9 tensors are unexpected" in message and "model.layers.1." in message


def test_mis_shaped_tensors_are_refused(demo_model_dir: Path, tmp_path: Path) -> None:
    # GIVEN a config whose MLP is wider than the checkpoint's
    model_dir = copy_model(demo_model_dir, tmp_path / "wide", intermediate_size=256)

    message = load_error(model_dir).message

    assert "6 tensors have other shapes" in message
    assert "model.layers.0.mlp.down_proj.weight (64, 192) where config.json needs (64, 256)" in message


def test_a_checkpoint_over_the_parameter_cap_is_refused(demo_model_dir: Path) -> None:
    message = load_error(demo_model_dir, max_model_parameters=1000).message

    assert "MAX_MODEL_PARAMETERS (1,000)" in message


def test_a_context_over_the_cap_is_refused(demo_model_dir: Path, tmp_path: Path) -> None:
    # GIVEN a config claiming a context of 10^12 tokens (it would switch the context check off)
    model_dir = copy_model(demo_model_dir, tmp_path / "long", max_position_embeddings=10**12)

    error = load_error(model_dir)

    assert "max_position_embeddings is 1000000000000" in error.message
    assert "MAX_CONTEXT_LENGTH (1048576)" in error.message and error.limit == 1_048_576


def test_what_transformers_reports_missing_after_a_load_is_refused() -> None:
    # The headers check covers the architectures whose checkpoint names are the model's; for the rest
    # (tensors merged at load, pre-quantized checkpoints) the load's own report is the check.
    report = {"missing_keys": {"b.weight", "a.weight"}, "mismatched_keys": set(), "unexpected_keys": {"x"}}

    problem = loading_problem(report)

    assert problem is not None and "2 tensors are missing" in problem and "a.weight, b.weight" in problem
    assert loading_problem({"missing_keys": set(), "mismatched_keys": set()}) is None


def test_load_model_refuses_a_lying_config_and_the_old_model_serves(
    fresh_engine: Engine, demo_model_dir: Path, tmp_path: Path
) -> None:
    # GIVEN a server with its model, and a copy whose config claims a layer more than its weights hold
    model_dir = copy_model(demo_model_dir, tmp_path / "three_layers", num_hidden_layers=3)
    client = TestClient(create_app(fresh_engine.settings, fresh_engine))

    # WHEN /load_model is asked for it
    response = client.post("/load_model", params={"model_path": str(model_dir)})

    # THEN 400 with the reason, and the model that was serving still serves
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "model_load_failed" and "num_hidden_layers is 3" in error["message"]
    assert str(tmp_path) not in error["message"]
    assert client.get("/health").json()["model_name"] == "final_model"
    assert client.post("/generate", json={"prompt": "x", "max_new_tokens": 2}).status_code == 200
