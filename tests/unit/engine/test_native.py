"""The decoder's layers stepped in C++ (function.engine.native) against the same step in Python and
against transformers: the same greedy tokens in float32, close logits in bfloat16 and int8/int4, rows
bitwise as alone in any batch; bad calls refused; and the reason /model_info gives when it is off,
not built, or built for another torch. `make test` builds it first (`python -m function
build-native`): these tests fail, not skip, where it is missing."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from function.__main__ import main
from function.engine import native
from function.engine.calibration import calibrate, rows_as_alone
from function.engine.decode_loop import decode
from function.engine.decoder import Decoder
from function.engine.decoder_choice import native_choice
from function.engine.engine import Engine
from function.engine.kv_cache import KVCache
from function.engine.torch_thread import in_own_thread
from function.engine.types import SamplingParams
from tests.support.settings import make_settings
from tests.support.tiny_models import fused_copy, greedy_config, theirs, tiny

PROMPTS = [[5, 17, 33, 2, 9], [40], [7, 7, 12]]


def with_cpp(decoder: Decoder) -> Decoder:
    decoder.native, reason = native_choice(decoder, "auto")
    assert reason.startswith("layers stepped in C++"), reason
    return decoder


def forced(
    decoder: Decoder, tokens: list[torch.Tensor], prompts: list[list[int]] = PROMPTS, *, exact: bool = True
) -> list[torch.Tensor]:
    """The logits of `prompts` prefilled in one cache, then of `tokens` ([rows, 1] each) a step each."""
    cache = decoder.new_cache(len(prompts), 16)
    logits = [torch.cat([decoder.prefill_row(torch.tensor(p), cache, r) for r, p in enumerate(prompts)])]
    positions = torch.tensor([[len(p)] for p in prompts])
    for step in tokens:
        logits.append(decoder.step_rows(step, positions, cache, exact=exact))
        positions = positions + 1
    return logits


def relative_error(mine: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((mine.float() - theirs.float()).norm() / theirs.float().norm())


@pytest.mark.parametrize(
    ("kind", "dtype", "tolerance"),
    [
        ("llama", torch.float32, 1e-5),  # tied embeddings, grouped-query attention
        ("qwen2", torch.float32, 1e-5),  # biases on q, k and v
        ("llama3", torch.float32, 1e-5),  # rescaled RoPE
        ("llama", torch.bfloat16, 0.05),  # rounded to bfloat16 between the ops, in another order
    ],
)
def test_the_cpp_step_computes_what_the_python_step_does(
    kind: str, dtype: torch.dtype, tolerance: float
) -> None:
    decoder = Decoder(fused_copy(tiny(kind, dtype)))
    tokens = [torch.randint(96, (3, 1), generator=torch.Generator().manual_seed(step)) for step in range(6)]
    with torch.inference_mode():
        python = forced(decoder, tokens)
        cpp = forced(with_cpp(decoder), tokens)

    assert all(relative_error(mine, want) < tolerance for mine, want in zip(cpp, python, strict=True))
    assert all(torch.isfinite(step).all() for step in cpp)


@pytest.mark.parametrize(
    ("head_dim", "heads", "kv_heads"),
    [
        (64, 7, 1),  # 7 query heads on one key head: AVX-512 calls of 4 heads, then 3
        (64, 6, 3),  # 2 a key head
        (128, 5, 1),  # calls of 2, 2 and 1 (head_dim 128: 2 heads fill the registers)
        (128, 2, 2),  # one a key head
    ],
)
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 0.05)])
def test_heads_sharing_a_key_head_attend_in_cpp_as_in_python(
    head_dim: int, heads: int, kv_heads: int, dtype: torch.dtype, tolerance: float
) -> None:
    """The attention loop's widths (AVX-512 where the CPU has it) and groups of query heads, over a
    float32 cache and (bf16 models) a bf16 one; the Python step's cache is float32."""
    shape = {"hidden_size": head_dim * heads, "num_attention_heads": heads, "num_key_value_heads": kv_heads}
    decoder = Decoder(fused_copy(tiny("llama", dtype, **shape)))
    assert decoder.head_dim == head_dim
    tokens = [torch.randint(96, (3, 1), generator=torch.Generator().manual_seed(step)) for step in range(6)]
    with torch.inference_mode():
        assert decoder.new_cache(1, 8).keys[0].dtype == torch.float32
        python = forced(decoder, tokens)
        cpp = forced(with_cpp(decoder), tokens)
        assert decoder.new_cache(1, 8).keys[0].dtype == dtype  # bf16 keys and values for a bf16 model

    assert all(relative_error(mine, want) < tolerance for mine, want in zip(cpp, python, strict=True))


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2"])
def test_greedy_tokens_in_cpp_equal_transformers_in_float32(kind: str) -> None:
    model = tiny(kind)
    ids = torch.tensor([[0, 0, 5, 17, 33], [7, 7, 12, 40, 2]])  # the first row left-padded
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    decoder = with_cpp(Decoder(fused_copy(model)))
    with torch.inference_mode():
        ours = decode(decoder, ids, mask, greedy_config(16), [])[:, ids.shape[1] :].tolist()

    assert ours == theirs(model, ids, mask, 16)


def test_rows_stepped_in_cpp_decode_bitwise_as_alone_in_any_batch() -> None:
    decoder = with_cpp(Decoder(fused_copy(tiny("qwen2", torch.bfloat16))))
    tokens = [torch.randint(96, (3, 1), generator=torch.Generator().manual_seed(step)) for step in range(6)]
    with torch.inference_mode():
        assert calibrate(decoder, 3) and rows_as_alone(decoder, 3, torch.Generator().manual_seed(1))
        together = forced(decoder, tokens)
        unmasked = forced(decoder, tokens, exact=False)  # "rows attending together": each alone here too
        alone = [
            forced(decoder, [step[row : row + 1] for step in tokens], [PROMPTS[row]]) for row in range(3)
        ]

    assert all(torch.equal(mine, want) for mine, want in zip(unmasked, together, strict=True))
    for row in range(3):
        assert all(
            torch.equal(step[row : row + 1], want) for step, want in zip(together, alone[row], strict=True)
        )


def test_quantized_layers_step_in_cpp_close_to_python(demo_model_dir: Path) -> None:
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    for quantization in ("8bit", "4bit"):
        cpp_engine = Engine(make_settings())
        python_engine = Engine(make_settings(native_step="false"))
        loaded, _ = cpp_engine.load(str(demo_model_dir), quantization)  # type: ignore[arg-type]
        in_python, _ = python_engine.load(str(demo_model_dir), quantization)  # type: ignore[arg-type]
        assert loaded.decoder is not None and in_python.decoder is not None
        assert loaded.decoder_reason.startswith(f"ours: a llama model on CPU (int{quantization[0]} matmuls")
        assert "; layers stepped in C++)" in loaded.decoder_reason
        assert "; layers stepped in Python: NATIVE_STEP=false)" in in_python.decoder_reason
        tokens = [
            torch.randint(100, (3, 1), generator=torch.Generator().manual_seed(step)) for step in range(4)
        ]
        with torch.inference_mode():
            cpp = forced(loaded.decoder, tokens)
            python = forced(in_python.decoder, tokens)
        assert all(relative_error(mine, want) < 0.05 for mine, want in zip(cpp, python, strict=True))
        assert cpp_engine.generate("The quick", greedy).continuations


def test_a_call_outside_the_cache_is_refused_not_written() -> None:
    decoder = with_cpp(Decoder(fused_copy(tiny("llama", torch.bfloat16))))
    cache = decoder.new_cache(1, 8)  # 64 columns: a whole block
    for tensor in (*cache.keys, *cache.values):
        tensor.zero_()
    x = decoder.embed(torch.tensor([[3]]))
    turns = torch.zeros(1, decoder.head_dim // 2, 2)

    with pytest.raises(RuntimeError, match="row 0 column 64 is outside the cache"):
        decoder.native.decode(x, turns, cache.keys, cache.values, [0], [64], [1, 1, 1, 1], 0)
    with pytest.raises(RuntimeError, match="row 1 column 0 is outside the cache"):
        decoder.native.decode(x, turns, cache.keys, cache.values, [1], [0], [1, 1, 1, 1], 0)
    with pytest.raises(RuntimeError, match="rotation"):
        decoder.native.decode(x, turns[:, :1], cache.keys, cache.values, [0], [0], [1, 1, 1, 1], 0)
    assert all(not tensor.any() for tensor in (*cache.keys, *cache.values))  # nothing written


def test_float16_activations_keep_the_python_step_and_say_why() -> None:
    decoder = Decoder(fused_copy(tiny("llama", torch.bfloat16)))
    decoder.dtype = torch.float16  # (float16 layers are not fused on a CPU without AVX-512 FP16)

    assert native_choice(decoder, "auto") == (
        None,
        "layers stepped in Python: the C++ step takes bfloat16 or float32 activations, not float16",
    )


@pytest.fixture
def build_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """`native` looking for its build in an empty directory; its cached load forgotten before and after."""
    monkeypatch.setattr(native, "BUILD_DIRECTORY", tmp_path)
    monkeypatch.setattr(native, "STAMP", tmp_path / "stamp.json")
    native.load.cache_clear()
    yield tmp_path
    native.load.cache_clear()


def test_a_missing_or_stale_build_leaves_the_python_loop_and_says_why(build_directory: Path) -> None:
    decoder = Decoder(fused_copy(tiny("llama", torch.bfloat16)))
    fix = "build it: python -m function build-native"

    assert native_choice(decoder, "auto") == (
        None,
        f"layers stepped in Python: the C++ step is not built ({fix})",
    )
    (build_directory / f"{native.MODULE_NAME}.so").write_bytes(b"")
    (build_directory / "stamp.json").write_text(json.dumps({"torch": "2.0.0", "source": "0"}))
    native.load.cache_clear()
    assert native_choice(decoder, "auto") == (
        None,
        "layers stepped in Python: the C++ step is built for torch 2.0.0, "
        f"not this torch {torch.__version__} ({fix})",
    )
    (build_directory / "stamp.json").write_text(json.dumps({"torch": torch.__version__, "source": "0"}))
    native.load.cache_clear()
    assert (
        native_choice(decoder, "auto")[1]
        == "layers stepped in Python: the C++ step is built for another Python or older than its sources "
        f"({fix})"
    )
    (build_directory / "stamp.json").write_text('{"torch": "2.1')  # cut short: no exception, a reason
    native.load.cache_clear()
    assert native_choice(decoder, "auto")[1] == f"layers stepped in Python: the C++ step is not built ({fix})"
    (build_directory / "stamp.json").write_text(json.dumps(native._stamp()))  # current, but no library
    native.load.cache_clear()
    layers, reason = native_choice(decoder, "auto")
    assert layers is None and reason.startswith("layers stepped in Python: the C++ step is not loadable: ")


def test_native_step_false_keeps_the_python_loop() -> None:
    decoder = Decoder(fused_copy(tiny("llama", torch.bfloat16)))

    assert native_choice(decoder, "false") == (None, "layers stepped in Python: NATIVE_STEP=false")


def test_build_native_is_quick_and_says_so_when_the_build_is_current(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["build-native"]) == 0

    assert capsys.readouterr().out == f"C++ step ready: {native.BUILD_DIRECTORY / native.MODULE_NAME}.so\n"


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="one CPU: nothing to run in parallel")
def test_the_cpp_step_runs_its_loops_on_torchs_threads() -> None:
    """Built with OpenMP (native.py's flags): without it ATen's parallel_for runs its body on the
    calling thread alone, and our matmul and attention used one core of two (on a thread that ends
    with the test, whose OpenMP workers go with it)."""
    module, _ = native.load()

    def threads_used(count: int) -> int:
        torch.set_num_threads(count)
        used: int = module.parallel_threads(64)
        return used

    before = torch.get_num_threads()
    try:
        assert in_own_thread(threads_used, 2) == 2
        assert in_own_thread(threads_used, 1) == 1
    finally:
        torch.set_num_threads(before)


def test_a_projection_of_another_width_is_refused_before_it_is_read() -> None:
    decoder = Decoder(fused_copy(tiny("llama", torch.bfloat16)))
    decoder.intermediate += 32  # the C++ step told of a wider MLP than its weights give
    layers, _, _ = native.native_layers(decoder)
    cache = decoder.new_cache(1, 8)
    x = decoder.embed(torch.tensor([[3]]))

    with pytest.raises(RuntimeError, match=r"a projection gave \[1, 1, 256\] BFloat16, not 1 rows of 320"):
        layers.decode(
            x, torch.zeros(1, decoder.head_dim // 2, 2), cache.keys, cache.values, [0], [0], [1] * 4, 0
        )


def test_short_prompts_prefill_in_cpp_and_long_ones_in_python(monkeypatch: pytest.MonkeyPatch) -> None:
    from function.engine import decoder as decoder_module

    monkeypatch.setattr(decoder_module, "NATIVE_PROMPT_TOKENS", 4)
    decoder = Decoder(fused_copy(tiny("llama", torch.float32)))
    short, long = torch.tensor([5, 17, 33, 2]), torch.tensor([5, 17, 33, 2, 9, 40])

    def prefilled(prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cache = decoder.new_cache(1, 16)
        logits = decoder.prefill_row(prompt, cache, 0)
        return logits, cache.keys[1][0, :, : len(prompt)].clone()

    with torch.inference_mode():
        python = [prefilled(prompt) for prompt in (short, long)]
        with_cpp(decoder)
        cpp = [prefilled(prompt) for prompt in (short, long)]

    (python_short, python_keys), (python_long, python_long_keys) = python
    (cpp_short, cpp_keys), (cpp_long, cpp_long_keys) = cpp
    assert not torch.equal(cpp_short, python_short)  # the C++ loops: another order of additions
    assert relative_error(cpp_short, python_short) < 1e-5 and relative_error(cpp_keys, python_keys) < 1e-5
    assert torch.equal(cpp_long, python_long) and torch.equal(cpp_long_keys, python_long_keys)  # Python's


def test_a_bf16_cache_holds_the_keys_and_values_as_pytorch_rounds_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The C++ step rounds what it writes into a bf16 cache as PyTorch's float32 -> bf16 copy does,
    and so as a prompt prefilled in Python writes it. Layer 0, whose inputs are the embeddings alone
    (a later layer's went through attention over the rounded or the float32 cache)."""
    from function.engine import decoder as decoder_module

    decoder = with_cpp(
        Decoder(fused_copy(tiny("llama", torch.bfloat16, hidden_size=256, num_attention_heads=4)))
    )
    prompt, steps = torch.tensor([5, 17, 33, 2, 9, 40, 7]), torch.tensor([[11], [3]])
    layers, kv_heads, head_dim = len(decoder.layers), decoder.kv_heads, decoder.head_dim

    def cached(dtype: torch.dtype) -> KVCache:
        cache = KVCache(layers, 1, kv_heads, 16, head_dim, dtype)
        decoder.prefill_row(prompt, cache, 0)
        for at, token in enumerate(steps):  # and decode steps' writes
            decoder.forward(token[None], torch.tensor([[len(prompt) + at]]), cache, len(prompt) + at)
        return cache

    with torch.inference_mode():
        bf16, f32 = cached(torch.bfloat16), cached(torch.float32)
        monkeypatch.setattr(decoder_module, "NATIVE_PROMPT_TOKENS", 0)  # the prompt prefilled in Python
        python = KVCache(layers, 1, kv_heads, 16, head_dim, torch.bfloat16)
        decoder.prefill_row(prompt, python, 0)

    end, prompted = len(prompt) + len(steps), len(prompt)
    for mine, wide, in_python in (
        (bf16.keys[0], f32.keys[0], python.keys[0]),
        (bf16.values[0], f32.values[0], python.values[0]),
    ):
        assert mine.dtype == torch.bfloat16
        assert torch.equal(mine[..., :end, :], wide[..., :end, :].to(torch.bfloat16))
        assert torch.equal(mine[..., :prompted, :], in_python[..., :prompted, :])
    assert bf16.keys[-1].dtype == torch.bfloat16 and bf16.keys[-1][..., :end, :].any()


def test_head_shapes_the_cpp_step_refuses_keep_the_python_step_and_say_why() -> None:
    decoder = Decoder(fused_copy(tiny("llama", torch.bfloat16)))
    decoder.head_dim = 15  # (as a model's odd head width would)

    layers, reason = native_choice(decoder, "auto")

    assert layers is None
    assert reason == (
        "layers stepped in Python: the C++ step does not take this model: "
        "heads 4, kv_heads 2, head_dim 15: kv_heads must divide heads, head_dim be even"
    )
