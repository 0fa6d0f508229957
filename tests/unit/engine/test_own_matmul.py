"""Our own bfloat16 matmul in the C++ step (function/engine/native_matmul.h), on the weights where
oneDNN packed them and on an output layer as the model holds it: close to oneDNN's results, each row
bitwise as alone in any batch (so a decoder on it decodes a step's rows exactly by construction, with
or without a micro-batcher), prompts past 8 tokens left to oneDNN, and /model_info saying which. It
needs AVX-512 BF16 (and, over packed weights, oneDNN's layout that it reads: not AMX's, where oneDNN
may pack another): elsewhere the decoder keeps oneDNN's matmuls and says nothing of ours (tested too)."""

from __future__ import annotations

import copy
import itertools
from typing import Any

import pytest
import torch

from function.engine import native
from function.engine.decoder import Decoder
from function.engine.decoder_choice import fuse_model, native_choice
from function.engine.engine import Engine
from tests.support.cpu import AVX512_BF16, OUR_MATMULS, needs_avx512_bf16, needs_our_matmuls
from tests.support.example_model import example_model_dir
from tests.support.settings import make_settings
from tests.support.tiny_models import tiny
from tests.unit.engine.test_native import PROMPTS, forced, relative_error

ODD = {"hidden_size": 96, "num_attention_heads": 6, "intermediate_size": 160}  # blocks of 64 columns, cut


def cpp(model: Any, *, own: bool, pack_output: bool = False) -> Decoder:
    """The C++ step on our matmuls (as the decoder picks them) or on oneDNN's; `pack_output`: a tied
    output layer packed for oneDNN (PACK_TIED_OUTPUT), else shared."""
    fused = copy.deepcopy(model)
    fuse_model(fused, pack_tied_output=pack_output)
    decoder = Decoder(fused)
    if not own:
        decoder.native, words, all_own = native.native_layers(decoder, own_matmuls=False)
        assert decoder.native is not None and (words, all_own) == ("", False)
        return decoder
    decoder.native, reason = native_choice(decoder, "auto")
    assert reason.startswith("layers stepped in C++"), reason
    assert ("matmuls our own (AVX-512 BF16)" in reason) == OUR_MATMULS, reason
    # a packed output layer on our matmul where it reads the layout, a shared one wherever AVX-512 BF16
    head = OUR_MATMULS if pack_output or not model.config.tie_word_embeddings else AVX512_BF16
    assert reason.endswith("; the output layer's too") == head, reason
    assert decoder.rows_alike == OUR_MATMULS
    return decoder


@needs_our_matmuls
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("columns", "inputs"), [(100, 64), (192, 96), (64, 32)])
def test_our_matmul_gives_onednns_products_each_row_as_alone(columns: int, inputs: int, threads: int) -> None:
    """Widths that cut the last block of 64 columns (its stores masked), with and without bias, one
    thread (blocks in order: a store past a row's end would land in the next row's) and two (the
    extension is built with OpenMP: its blocks split between the threads)."""
    module, _ = native.load()
    generator = torch.Generator().manual_seed(columns)
    weight = torch.randn(columns, inputs, generator=generator).to(torch.bfloat16)
    packed = torch.ops.mkldnn._reorder_linear_weight(weight, 1)
    bias = torch.randn(columns, generator=generator).to(torch.bfloat16)
    x = torch.randn(11, inputs, generator=generator).to(torch.bfloat16)
    assert module.own_matmul_agrees(packed, None) and module.own_matmul_agrees(packed, bias)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows, shift in itertools.product(range(1, 12), (None, bias)):  # 9-11: calls of 8 and the rest
            mine = module.own_matmul(x[:rows], packed, shift)
            theirs = torch.ops.mkldnn._linear_pointwise(x[:rows], packed, shift, "none", [None], "")
            assert mine.shape == theirs.shape == (rows, columns)
            assert all(relative_error(mine[row], theirs[row]) < 1e-2 for row in range(rows))
            alone = [module.own_matmul(x[row : row + 1], packed, shift)[0] for row in range(rows)]
            assert all(torch.equal(mine[row], alone[row]) for row in range(rows))
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match="a bias: float32, one a column"):
        module.own_matmul(x[:1], packed, bias[:3])


@needs_our_matmuls
def test_our_matmul_takes_only_the_packed_weights_it_reads() -> None:
    """`own_matmul_agrees` (the load's check): bf16 packed for oneDNN, inputs by 32; not float32's
    packing, nor bf16 whose inputs oneDNN packs otherwise (then the decoder keeps oneDNN's matmul)."""
    module, _ = native.load()
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(128, 64, generator=generator)
    assert module.own_matmul_agrees(torch.ops.mkldnn._reorder_linear_weight(weight.to(torch.bfloat16), 1))
    assert not module.own_matmul_agrees(torch.ops.mkldnn._reorder_linear_weight(weight, 1))
    narrow = weight[:, :48].contiguous().to(torch.bfloat16)
    assert not module.own_matmul_agrees(torch.ops.mkldnn._reorder_linear_weight(narrow, 1))
    with pytest.raises(RuntimeError, match="not in the packed layout our matmul reads"):
        module.own_matmul(torch.ones(1, 64), torch.ops.mkldnn._reorder_linear_weight(weight, 1))


@needs_avx512_bf16
@pytest.mark.parametrize("threads", [1, 2])
def test_our_matmul_on_weights_as_the_model_holds_them(threads: int) -> None:
    """An output layer tied to the embeddings: [columns, inputs] row after row, 4 columns a step."""
    module, _ = native.load()
    generator = torch.Generator().manual_seed(threads)
    weight = torch.randn(100, 96, generator=generator).to(torch.bfloat16)
    x = torch.randn(11, 96, generator=generator).to(torch.bfloat16)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for rows in (1, 3, 8, 11):  # 11: calls of 8 and 3
            mine = module.own_plain_matmul(x[:rows, None], weight)
            theirs = torch.nn.functional.linear(x[:rows, None], weight)
            assert mine.shape == theirs.shape == (rows, 1, 100)
            assert all(relative_error(mine[row], theirs[row]) < 1e-2 for row in range(rows))
            alone = [module.own_plain_matmul(x[row : row + 1, None], weight)[0] for row in range(rows)]
            assert all(torch.equal(mine[row], alone[row]) for row in range(rows))
    finally:
        torch.set_num_threads(before)
    with pytest.raises(RuntimeError, match="x: "):
        module.own_plain_matmul(x[:1, :64], weight)
    with pytest.raises(RuntimeError, match="columns by 4"):
        module.own_plain_matmul(x[:1], weight[:99])
    with pytest.raises(RuntimeError, match="rows of inputs by 32"):
        module.own_plain_matmul(x[:1, :90], weight[:, :90].contiguous())


@needs_our_matmuls
@pytest.mark.parametrize(
    ("kind", "shape"),
    [("llama", {}), ("qwen2", {}), ("llama", ODD)],  # qwen2: biases on q, k and v
    ids=["llama", "qwen2-biases", "odd-widths"],
)
def test_our_matmuls_step_as_onednn_does_but_for_rounding(kind: str, shape: dict[str, int]) -> None:
    model = tiny(kind, torch.bfloat16, **shape)
    tokens = [torch.randint(96, (3, 1), generator=torch.Generator().manual_seed(step)) for step in range(6)]
    with torch.inference_mode():
        ours = forced(cpp(model, own=True), tokens)
        onednn = forced(cpp(model, own=False), tokens)

    # (`cpp` checked the reason names ours; on sums this short the two orders often round alike)
    assert all(relative_error(mine, want) < 0.02 for mine, want in zip(ours, onednn, strict=True))


@needs_our_matmuls
@pytest.mark.parametrize("pack_output", [False, True], ids=["output-shared", "output-packed"])
def test_rows_on_our_matmuls_decode_bitwise_as_alone_in_any_batch(pack_output: bool) -> None:
    """No calibration: each output adds its pairs in one order whatever the rows; the tied output
    layer on our matmul over its shared weights, or over oneDNN's packed copy."""
    decoder = cpp(tiny("llama", torch.bfloat16, **ODD), own=True, pack_output=pack_output)
    tokens = [torch.randint(96, (3, 1), generator=torch.Generator().manual_seed(step)) for step in range(6)]
    with torch.inference_mode():
        together = forced(decoder, tokens)
        alone = [
            forced(decoder, [step[row : row + 1] for step in tokens], [PROMPTS[row]]) for row in range(3)
        ]

    for row in range(3):
        assert all(
            torch.equal(step[row : row + 1], want) for step, want in zip(together, alone[row], strict=True)
        )


@needs_our_matmuls
def test_prompts_past_8_tokens_prefill_on_onednn() -> None:
    """A model wide enough that the two orders of additions round apart (on this seed)."""
    model = tiny("llama", torch.bfloat16, hidden_size=256, num_attention_heads=4, intermediate_size=1536)
    ours, onednn = cpp(model, own=True), cpp(model, own=False)
    with torch.inference_mode():
        logits = {
            (name, tokens): decoder.prefill_row(torch.arange(3, 3 + tokens), decoder.new_cache(1, 16), 0)
            for name, decoder in (("ours", ours), ("onednn", onednn))
            for tokens in (8, 9)
        }

    assert not torch.equal(logits["ours", 8], logits["onednn", 8])  # 8 tokens: ours
    assert relative_error(logits["ours", 8], logits["onednn", 8]) < 0.02
    assert torch.equal(logits["ours", 9], logits["onednn", 9])  # 9: oneDNN's


def test_model_info_says_whose_matmuls_with_and_without_a_batcher() -> None:
    """The example model (SmolLM2, tied output layer) one request at a time with its output layer
    shared, as on Lambda; and with a batcher, its output layer packed (as `make serve` has it where
    memory allows): our matmuls either way, the rows of a step bitwise as alone by construction."""
    alone = Engine(make_settings(cpu_dtype="bfloat16", batch_max_size=1, pack_tied_output="false"))
    batched = Engine(make_settings(cpu_dtype="bfloat16", batch_max_size=4, pack_tied_output="true"))
    loaded, _ = alone.load(str(example_model_dir()))
    in_batches, _ = batched.load(str(example_model_dir()))

    mine = "120 of its 120 matmuls our own (AVX-512 BF16); the output layer's too"
    for engine, model in ((alone, loaded), (batched, in_batches)):
        reason = model.decoder_reason
        assert model.dtype == "bfloat16" and "layers stepped in C++" in reason
        assert (mine in reason) == OUR_MATMULS, reason
        assert ("(our own matmuls: by construction)" in reason) == OUR_MATMULS, reason
        assert engine.generate("The capital of France is", greedy()).continuations[0].startswith(" Paris")
    assert "tied output layer packed" in in_batches.decoder_reason


def greedy() -> Any:
    from function.engine.types import SamplingParams

    return SamplingParams(max_new_tokens=8, temperature=0)
