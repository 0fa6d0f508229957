"""Our CPU decoder (function.engine.decoder) against transformers on the same weights: the same greedy
tokens in float32, close logits in bfloat16, GQA, biases and tied embeddings, left padding, int8/int4
layers fused; and when transformers decodes instead, with the reason."""

from __future__ import annotations

import copy
import mmap
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from function.engine.calibration import calibrate, rows_as_alone
from function.engine.decode_loop import decode
from function.engine.decoder import Decoder
from function.engine.decoder_choice import fuse_model, unsupported_reason
from function.engine.engine import Engine
from function.engine.projections import PackedProjection, ProjectionSlice, kept_spans, release_pages
from function.engine.types import SamplingParams
from tests.support.settings import make_settings
from tests.support.tiny_models import SHAPE, fused_copy, ours, theirs, tiny

GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2"])
def test_greedy_tokens_equal_transformers_in_float32(kind: str) -> None:
    model = tiny(kind)
    input_ids = torch.tensor([[5, 17, 42, 8, 33, 2, 71]])
    mask = torch.ones_like(input_ids)

    assert ours(model, input_ids, mask, 24) == theirs(model, input_ids, mask, 24)


def test_left_padded_rows_equal_transformers_batch() -> None:
    model = tiny("llama")
    input_ids = torch.tensor([[0, 0, 0, 9, 4, 77], [3, 14, 15, 92, 65, 35]])
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])

    assert ours(model, input_ids, mask, 16) == theirs(model, input_ids, mask, 16)


def test_bfloat16_logits_stay_close_to_transformers() -> None:
    model = tiny("llama", torch.bfloat16)
    fused = copy.deepcopy(model)
    fuse_model(fused)
    decoder = Decoder(fused)
    input_ids = torch.tensor([[5, 17, 42, 8, 33, 2, 71, 6]])
    with torch.inference_mode():
        expected = model(input_ids=input_ids).logits[0, -1].float()
        cache = decoder.new_cache(1, 16)
        actual = decoder.forward(input_ids, torch.arange(8)[None], cache, 0)[0].float()
        # and one decoded token after the prompt, from the cache
        expected_next = model(input_ids=torch.cat((input_ids, torch.tensor([[9]])), 1)).logits[0, -1].float()
        actual_next = decoder.forward(torch.tensor([[9]]), torch.tensor([[8]]), cache, 8)[0].float()

    for want, got in ((expected, actual), (expected_next, actual_next)):
        assert ((got - want).norm() / want.norm()) < 0.02


def test_fused_model_still_runs_in_transformers_and_shares_its_weights() -> None:
    model = tiny("llama")
    fused = copy.deepcopy(model)
    fuse_model(fused)
    attention = fused.model.layers[0].self_attn
    input_ids = torch.tensor([[5, 17, 42, 8]])

    # q, k and v are slices of one packed matmul: one weight, held once
    assert {type(attention.q_proj), type(attention.k_proj), type(attention.v_proj)} == {ProjectionSlice}
    assert attention.q_proj.fused is attention.v_proj.fused
    assert isinstance(attention.q_proj.fused, PackedProjection)
    assert sum(1 for module in fused.modules() if isinstance(module, PackedProjection)) == 2 * 4
    # the tied output layer is left as it is: one copy of the embedding
    assert type(fused.lm_head) is torch.nn.Linear and fused.lm_head.weight is fused.model.embed_tokens.weight
    with torch.inference_mode():
        torch.testing.assert_close(fused(input_ids=input_ids).logits, model(input_ids=input_ids).logits)


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_layers_decode_as_transformers_does(demo_model_dir: Path, quantization: Any) -> None:
    ours_engine = Engine(make_settings())
    theirs_engine = Engine(make_settings(decoder="transformers"))
    ours_engine.load(str(demo_model_dir), quantization)
    theirs_engine.load(str(demo_model_dir), quantization)

    prompt = "The quick brown fox"
    assert ours_engine.current is not None and ours_engine.current.decoder is not None
    assert ours_engine.current.decoder_reason.startswith(f"ours: a llama model on CPU (int{quantization[0]}")
    assert (
        ours_engine.generate(prompt, GREEDY).continuations
        == theirs_engine.generate(prompt, GREEDY).continuations
    )


def test_unsupported_models_decode_with_transformers_and_say_why() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    scaled = LlamaForCausalLM(
        LlamaConfig(
            **{**SHAPE, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}
        )
    )

    assert unsupported_reason(gpt2) == "model type 'gpt2' (ours covers llama, mistral, qwen2)"
    assert unsupported_reason(scaled) == "RoPE type 'dynamic'"
    assert unsupported_reason(tiny("llama")) is None


def test_the_setting_and_adapters_choose_transformers(demo_model_dir: Path, adapter_dir: Path) -> None:
    chosen = Engine(make_settings(decoder="transformers"))
    loaded, _ = chosen.load(str(demo_model_dir))
    with_adapters = Engine(make_settings())
    adapted, _ = with_adapters.load(str(demo_model_dir), adapters={"sql": str(adapter_dir)})
    default = Engine(make_settings())
    plain, _ = default.load(str(demo_model_dir))

    assert loaded.decoder is None and loaded.decoder_reason == "transformers: DECODER=transformers"
    assert adapted.decoder is None and "adapters" in adapted.decoder_reason
    assert plain.decoder is not None and plain.decoder_reason.startswith("ours: a llama model on CPU")


def test_replaced_weights_give_their_pages_back_and_kept_ones_stay() -> None:
    # Two weights side by side in one private anonymous mapping, as WEIGHTS_IN_MEMORY lays them out
    buffer = mmap.mmap(-1, 8 * mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    values = torch.frombuffer(buffer, dtype=torch.float32)
    values.fill_(1.5)
    half = values.numel() // 2 + 7  # not on a page boundary: the page they share must stay
    replaced, kept = values[:half], values[half:]

    released = release_pages([replaced], kept_spans([kept]))

    assert released == 4 * mmap.PAGESIZE  # the whole pages only replaced's elements lie in
    assert torch.all(kept == 1.5)
    assert torch.count_nonzero(replaced) == replaced.numel() - 4 * mmap.PAGESIZE // 4


def test_calibrate_measures_rows_bitwise_as_alone_in_bfloat16() -> None:
    model = tiny("llama", torch.bfloat16)
    fuse_model(model)
    decoder = Decoder(model)

    with torch.inference_mode():
        assert calibrate(decoder, 4)
        assert rows_as_alone(decoder, 4, torch.Generator().manual_seed(7))


class RoundsWithTheBatch(torch.nn.Module):
    """A matmul whose rounding depends on how many rows it is called with, as some kernels' does."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        output: torch.Tensor = self.inner(x)
        return output + 0.5 * (x.shape[0] > 2)


def test_calibrate_finds_a_matmul_that_rounds_with_the_batch() -> None:
    model = tiny("llama", torch.bfloat16)
    fuse_model(model)
    decoder = Decoder(model)
    for layer in decoder.layers:
        layer.__dict__["down"] = RoundsWithTheBatch(layer.down)  # a frozen dataclass: set it in place

    with torch.inference_mode():
        assert not calibrate(decoder, 4)
    assert decoder.least_rows == {} and not decoder.batch_exact


@pytest.mark.parametrize("exact", [True, False])
def test_rows_of_different_lengths_never_read_leftover_memory(exact: bool) -> None:
    # torch.empty's pages may hold anything a freed tensor left: here NaN everywhere
    decoder = Decoder(fused_copy(tiny("llama")))
    prompts = [torch.tensor([5, 17, 42, 8, 33]), torch.tensor([9])]
    expected = []
    with torch.inference_mode():
        for prompt in prompts:  # each alone, beside the leftovers beyond its end
            alone = decoder.new_cache(1, 8)
            for tensor in (*alone.keys, *alone.values):
                tensor.fill_(float("nan"))
            decoder.forward(prompt[None], torch.arange(len(prompt))[None], alone, 0)
            at = len(prompt)
            expected.append(decoder.forward(torch.tensor([[3]]), torch.tensor([[at]]), alone, at)[0])
        cache = decoder.new_cache(2, 8)
        for tensor in (*cache.keys, *cache.values):
            tensor.fill_(float("nan"))
        for row, prompt in enumerate(prompts):
            decoder.prefill_row(prompt, cache, row)
        together = decoder.step_rows(torch.tensor([[3], [3]]), torch.tensor([[5], [1]]), cache, exact=exact)

    assert torch.isfinite(together).all()
    torch.testing.assert_close(together, torch.stack(expected))


def test_finished_rows_leave_an_exact_batch_and_the_others_decode_as_alone() -> None:
    decoder = Decoder(fused_copy(tiny("qwen2", torch.bfloat16)))  # untied: its greedy rows vary
    prompts = [[12, 80, 7, 7], [9], [50, 51]]
    with torch.inference_mode():
        assert calibrate(decoder, 3)

        def run(rows: list[list[int]], eos: int | None) -> list[list[int]]:
            width = max(len(row) for row in rows)
            ids = torch.tensor([[0] * (width - len(row)) + row for row in rows])
            mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
            config = GenerationConfig(max_new_tokens=10, do_sample=False, pad_token_id=0, eos_token_id=eos)
            return decode(decoder, ids, mask, config, [])[:, width:].tolist()

        alone = [run([prompt], None)[0] for prompt in prompts]
        # an end token the first row reaches after a step or more, and the others never produce
        stop = next(
            at
            for at in range(1, 10)
            if alone[0][at] not in alone[0][:at] and all(alone[0][at] not in row for row in alone[1:])
        )
        rows_per_step: list[int] = []
        step_rows = decoder.step_rows

        def counting(tokens: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            rows_per_step.append(tokens.shape[0])
            return step_rows(tokens, *args, **kwargs)

        decoder.step_rows = counting  # type: ignore[method-assign]  # a spy: the real step runs
        together = run(prompts, alone[0][stop])

    assert together[0] == alone[0][: stop + 1] + [0] * (9 - stop)  # stopped, then padding
    assert together[1:] == alone[1:]  # decoded without it, bitwise as alone
    assert rows_per_step == [3] * stop + [2] * (9 - stop)  # the finished row left the batch


def test_a_batch_bigger_than_calibrated_runs_its_matmuls_in_calibrated_calls() -> None:
    decoder = Decoder(fused_copy(tiny("qwen2", torch.bfloat16)))
    prompts = [torch.tensor(prompt) for prompt in ([12, 80, 7, 7], [9], [50, 51], [3, 14, 15], [60, 2, 71])]
    with torch.inference_mode():
        assert calibrate(decoder, 2)  # measured for 2 rows; the batch below has 5
        cache = decoder.new_cache(5, 8)
        together = [decoder.prefill_row(prompt, cache, row) for row, prompt in enumerate(prompts)]
        step = decoder.step_rows(
            torch.tensor([[4]] * 5), torch.tensor([[len(prompt)] for prompt in prompts]), cache
        )
        alone = []
        for prompt in prompts:
            single = decoder.new_cache(1, 8)
            decoder.forward(prompt[None], torch.arange(len(prompt))[None], single, 0)
            at = len(prompt)
            alone.append(decoder.forward(torch.tensor([[4]]), torch.tensor([[at]]), single, at)[0])

    assert decoder.measured_rows == 2 and len(together) == 5
    assert torch.equal(step, torch.stack(alone))
