"""A tied output layer (sharing the input embedding's weight, as SmolLM2's): packed for oneDNN too
where PACK_TIED_OUTPUT decides so (function.engine.decoder_choice), leaving the embedding as it was."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from function.engine import decoder_choice
from function.engine.decode_loop import decode
from function.engine.decoder import Decoder
from function.engine.decoder_choice import fuse_model, tied_output_choice
from function.engine.engine import Engine
from function.engine.projections import PackedProjection
from function.engine.types import SamplingParams
from tests.support.example_model import example_model_dir
from tests.support.settings import make_settings
from tests.support.tiny_models import greedy_config, theirs, tiny


def test_a_packed_tied_output_layer_decodes_as_transformers_and_leaves_the_embedding() -> None:
    model = tiny("llama")  # tied
    embedding = model.model.embed_tokens.weight.detach().clone()
    fused = copy.deepcopy(model)
    fuse_model(fused, pack_tied_output=True)
    input_ids = torch.tensor([[5, 17, 42, 8, 33, 2, 71]])
    mask = torch.ones_like(input_ids)
    with torch.inference_mode():
        ours = decode(Decoder(fused), input_ids, mask, greedy_config(24), [])[:, input_ids.shape[1] :]
        logits = fused(input_ids=input_ids).logits  # transformers' own forward, through the packed layer

    assert isinstance(fused.lm_head, PackedProjection)
    assert torch.equal(fused.model.embed_tokens.weight, embedding)  # not released: the input still reads it
    assert ours.tolist() == theirs(model, input_ids, mask, 24)
    torch.testing.assert_close(logits, model(input_ids=input_ids).logits)


def test_pack_tied_output_auto_packs_in_server_mode_where_memory_allows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = tiny("llama")
    megabytes = model.lm_head.weight.numel() * 4 / 2**20

    assert tied_output_choice(model, "auto", on_lambda=True) == (
        False,
        "tied output layer shared: on Lambda, packing it would raise the INIT's memory peak",
    )
    assert tied_output_choice(model, "true", on_lambda=True) == (
        True,
        "tied output layer packed: PACK_TIED_OUTPUT=true",
    )
    assert tied_output_choice(model, "false", on_lambda=False)[0] is False
    assert tied_output_choice(tiny("qwen2"), "true", on_lambda=False) == (
        False,
        "",
    )  # not tied: packed anyway
    monkeypatch.setattr(decoder_choice, "memory_available", lambda: int(4 * megabytes * 2**20) + 1)
    assert tied_output_choice(model, "auto", on_lambda=False)[0] is True
    monkeypatch.setattr(decoder_choice, "memory_available", lambda: int(4 * megabytes * 2**20) - 1)
    packed, reason = tied_output_choice(model, "auto", on_lambda=False)
    assert not packed and reason.startswith(
        "tied output layer shared: its 0 MB copy is over a quarter of the"
    )
    monkeypatch.setattr(decoder_choice, "memory_available", lambda: None)
    assert tied_output_choice(model, "auto", on_lambda=False) == (
        False,
        "tied output layer shared: the memory available is unknown",
    )


@pytest.mark.slow
def test_the_engine_says_whether_it_packed_the_tied_output_layer() -> None:
    example_model: Path = example_model_dir()  # SmolLM2-135M-Instruct: its output layer is tied
    packed = Engine(make_settings(model_path=str(example_model), pack_tied_output="true"))
    packed.load_startup_model()
    shared = Engine(make_settings(model_path=str(example_model), pack_tied_output="false"))
    shared.load_startup_model()
    assert packed.current is not None and shared.current is not None
    assert "; tied output layer packed: PACK_TIED_OUTPUT=true;" in packed.current.decoder_reason
    assert isinstance(packed.current.model.lm_head, PackedProjection)
    assert type(shared.current.model.lm_head) is torch.nn.Linear
    ids = packed.current.tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.inference_mode():  # two kernels for one weight: close logits, the same next token
        want = shared.current.model(input_ids=ids).logits[0, -1].float()
        got = packed.current.model(input_ids=ids).logits[0, -1].float()
    assert (got - want).norm() / want.norm() < 0.01 and got.argmax() == want.argmax()
    params = SamplingParams(max_new_tokens=4, temperature=0)
    assert packed.generate("The capital of France is", params).continuations[0].strip()
