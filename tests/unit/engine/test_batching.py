"""Micro-batching on real demo models: batched answers equal unbatched ones, and what may share a batch."""

from __future__ import annotations

import shutil
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import pytest

from function.engine.batching import BatcherClosedError, MicroBatcher, batch_key, exact_batching
from function.engine.engine import Engine
from function.engine.logits import PaddingAwareRepetitionPenalty
from function.engine.types import Cancellation, Completion, SamplingParams
from function.errors import ClientClosedRequestError
from tests.support.cancellation import CancelAfter
from tests.support.cpu import OUR_MATMULS, onednn_matmuls
from tests.support.settings import make_settings

T = TypeVar("T")

PROMPTS = [
    "Hello",
    "머신러닝이란 무엇인가요? 자세히 설명해 주세요.",
    "The quick brown fox jumps over the lazy dog",
    "a",
    "Python이란",
    "오늘 날씨가 좋네요 그래서",
]


def concurrently(calls: list[Callable[[], T]]) -> list[T]:
    """Start every call at once (a barrier), return their results in order."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], T]) -> T:
        barrier.wait()
        return call()

    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
        futures = [pool.submit(run, call) for call in calls]
        return [future.result() for future in futures]


def engine_for(model_dir: Path, **overrides: Any) -> Engine:
    engine = Engine(make_settings(model_path=str(model_dir), **overrides))
    engine.load_startup_model()
    assert engine.current is not None
    return engine


@pytest.fixture(scope="module")
def unbatched(demo_model_dir: Path) -> Engine:
    return engine_for(demo_model_dir, batch_max_size=1)


@pytest.fixture(scope="module")
def batched(demo_model_dir: Path) -> Iterator[Engine]:
    # A long window: the batch closes when it is full, so every request of a test lands in it.
    engine = engine_for(demo_model_dir, batch_max_size=len(PROMPTS), batch_window_ms=1000)
    yield engine
    assert engine.batcher is not None
    engine.batcher.close()


def same_answer(got: Completion, expected: Completion) -> None:
    assert got.continuations == expected.continuations
    assert got.finish_reasons == expected.finish_reasons
    assert got.completion_tokens == expected.completion_tokens
    assert got.prompt_tokens == expected.prompt_tokens


def test_batched_greedy_answers_equal_unbatched(unbatched: Engine, batched: Engine) -> None:
    # GIVEN prompts of different lengths (so rows are padded), each with its own max_new_tokens, and a
    # repetition penalty (which must not count the padding)
    params = [
        SamplingParams(max_new_tokens=limit, temperature=0, repetition_penalty=1.3)
        for limit in (24, 5, 17, 24, 9, 12)
    ]
    expected = [unbatched.generate(prompt, p) for prompt, p in zip(PROMPTS, params, strict=True)]

    # WHEN they arrive together at the batching engine
    got = concurrently(
        [
            lambda prompt=prompt, p=p: batched.generate(prompt, p)
            for prompt, p in zip(PROMPTS, params, strict=True)
        ]
    )

    # THEN they shared one generate call, and each answer is the one it gets alone
    assert [completion.batch_size for completion in got] == [len(PROMPTS)] * len(PROMPTS)
    assert [completion.batch_size for completion in expected] == [1] * len(PROMPTS)
    for completion, alone in zip(got, expected, strict=True):
        same_answer(completion, alone)
    assert {len(c.continuations[0]) for c in got} != {0}


def stop_string_from(text: str) -> str:
    """Two characters from the middle of a continuation: a stop string it is sure to hit."""
    middle = len(text) // 2
    return text[middle : middle + 2]


def test_rows_that_stop_early_match_unbatched(unbatched: Engine, batched: Engine) -> None:
    # GIVEN a stop string that one prompt's continuation contains and others (likely) don't
    plain = SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0)
    stop = stop_string_from(unbatched.generate(PROMPTS[1], plain).continuations[0])
    params = SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0, stop=(stop,))
    expected = [unbatched.generate(prompt, params) for prompt in PROMPTS]
    assert {"stop", "length"} <= {c.finish_reasons[0] for c in expected}  # both kinds of row are in the batch

    got = concurrently([lambda prompt=prompt: batched.generate(prompt, params) for prompt in PROMPTS])

    assert all(completion.batch_size == len(PROMPTS) for completion in got)
    for completion, alone in zip(got, expected, strict=True):
        same_answer(completion, alone)


@pytest.fixture(scope="module")
def no_pad_model_dir(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model with no pad token, like many Llama checkpoints: the loader pads with the end token."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("no_pad") / "no_pad_model"
    shutil.copytree(demo_model_dir, directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(directory)
    return directory


def test_a_model_without_a_pad_token_batches_exactly(no_pad_model_dir: Path) -> None:
    alone = engine_for(no_pad_model_dir, batch_max_size=1)
    together = engine_for(no_pad_model_dir, batch_max_size=4, batch_window_ms=1000)
    assert together.current is not None
    tokenizer = together.current.tokenizer
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # finished rows are filled with end tokens
    plain = SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.2)
    stop = stop_string_from(alone.generate(PROMPTS[0], plain).continuations[0])
    params = SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.2, stop=(stop,))
    prompts = PROMPTS[:4]
    expected = [alone.generate(prompt, params) for prompt in prompts]

    got = concurrently([lambda prompt=prompt: together.generate(prompt, params) for prompt in prompts])

    assert all(completion.batch_size == 4 for completion in got)
    for completion, single in zip(got, expected, strict=True):
        same_answer(completion, single)  # token counts too: the filler end token is not counted


def test_chat_and_generate_share_a_batch_and_greedy_copies_match(unbatched: Engine, batched: Engine) -> None:
    greedy = SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.1)
    twice = SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=1.1, num_return_sequences=2)
    calls: list[Callable[[], Completion]] = [
        lambda: batched.chat("머신러닝이란?", "", greedy),
        lambda: batched.chat("Summarize", "The quick brown fox", twice),
        lambda: batched.generate("Hello there", twice),
    ]
    expected = [
        unbatched.chat("머신러닝이란?", "", greedy),
        unbatched.chat("Summarize", "The quick brown fox", twice),
        unbatched.generate("Hello there", twice),
    ]

    got = concurrently(calls)

    # The window closes on time (the batch is not full): all three arrived within it.
    assert [completion.batch_size for completion in got] == [3, 3, 3]
    for completion, alone in zip(got, expected, strict=True):
        same_answer(completion, alone)
    assert len(got[1].continuations) == 2


def test_sampled_requests_batch_by_their_parameters(batched: Engine) -> None:
    warm = SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.9, num_return_sequences=2)
    hot = SamplingParams(max_new_tokens=8, temperature=1.3, top_p=0.9)
    params = [warm, hot, warm, hot, warm]

    got = concurrently([lambda p=p: batched.generate("Hello", p) for p in params])

    assert [completion.batch_size for completion in got] == [3, 2, 3, 2, 3]
    assert [len(completion.continuations) for completion in got] == [2, 1, 2, 1, 2]
    assert all(reason in ("length", "stop") for c in got for reason in c.finish_reasons)


def test_sampled_rows_go_back_to_their_own_request(unbatched: Engine, batched: Engine) -> None:
    # top_k=1 samples the argmax: each row must be its own prompt's greedy text, n times over
    sampled = SamplingParams(max_new_tokens=10, temperature=0.8, top_k=1, num_return_sequences=2)
    greedy = SamplingParams(max_new_tokens=10, temperature=0, repetition_penalty=sampled.repetition_penalty)
    prompts = PROMPTS[:3]
    expected = [unbatched.generate(prompt, greedy).continuations[0] for prompt in prompts]

    got = concurrently([lambda prompt=prompt: batched.generate(prompt, sampled) for prompt in prompts])

    assert [completion.batch_size for completion in got] == [3, 3, 3]
    assert [completion.continuations for completion in got] == [[text, text] for text in expected]
    assert len(set(expected)) == 3


def test_seeded_samples_run_alone_and_keep_their_seed(unbatched: Engine, batched: Engine) -> None:
    params = [SamplingParams(max_new_tokens=12, temperature=0.9, seed=seed) for seed in (1, 2, 3, 1)]
    expected = [unbatched.generate("Python이란", p) for p in params]

    got = concurrently([lambda p=p: batched.generate("Python이란", p) for p in params])

    assert [completion.batch_size for completion in got] == [1, 1, 1, 1]
    for completion, alone in zip(got, expected, strict=True):
        same_answer(completion, alone)
    assert got[0].continuations == got[3].continuations  # same seed, same sample


def test_a_request_that_runs_alone_does_not_wait_for_the_window(demo_model_dir: Path) -> None:
    engine = engine_for(demo_model_dir, batch_max_size=8, batch_window_ms=1000)
    engine.generate("warm up", SamplingParams(max_new_tokens=2, temperature=0.9, seed=0))

    started = time.monotonic()
    engine.generate("Hello", SamplingParams(max_new_tokens=2, temperature=0.9, seed=5))

    assert time.monotonic() - started < 0.5  # the window is 1 s; a seeded sample never shares


def test_half_precision_greedy_runs_alone_unless_allowed(demo_model_dir: Path) -> None:
    # transformers' padded batches: bf16 rows round with the batch, so greedy requests run alone
    greedy = SamplingParams(max_new_tokens=6, temperature=0)
    strict = engine_for(
        demo_model_dir, cpu_dtype="bfloat16", batch_max_size=3, batch_window_ms=1000, decoder="transformers"
    )
    allowed = engine_for(
        demo_model_dir,
        cpu_dtype="bfloat16",
        batch_max_size=3,
        batch_window_ms=1000,
        batch_reduced_precision=True,
        decoder="transformers",
    )
    assert strict.current is not None and not exact_batching(strict.current)

    alone = concurrently([lambda prompt=prompt: strict.generate(prompt, greedy) for prompt in PROMPTS[:3]])
    together = concurrently(
        [lambda prompt=prompt: allowed.generate(prompt, greedy) for prompt in PROMPTS[:3]]
    )

    assert [completion.batch_size for completion in alone] == [1, 1, 1]
    assert [completion.batch_size for completion in together] == [3, 3, 3]


@pytest.mark.parametrize(
    ("quantization", "native_step", "onednn"),
    [("none", "auto", False), ("none", "auto", True), ("8bit", "auto", False), ("none", "false", False)],
)
def test_our_decoder_batches_bf16_and_quantized_greedy_rows_bitwise_as_alone(
    demo_model_dir: Path, quantization: str, native_step: str, onednn: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batched rows round as alone: bf16 in C++ on our own matmuls by construction (where the CPU has
    # AVX-512 BF16), else measured at load (function.engine.calibration); the layers stepped in C++
    # (function.engine.native) or in Python
    # `onednn`: as on a CPU without AVX-512 BF16, oneDNN's matmuls, measured
    if onednn:
        onednn_matmuls(monkeypatch)
    greedy = SamplingParams(max_new_tokens=12, temperature=0)
    batched = engine_for(
        demo_model_dir, cpu_dtype="bfloat16", batch_max_size=4, batch_window_ms=1000, native_step=native_step
    )
    if quantization != "none":
        batched.load(str(demo_model_dir), quantization)  # type: ignore[arg-type]
    unbatched = engine_for(demo_model_dir, cpu_dtype="bfloat16", batch_max_size=1, native_step=native_step)
    if quantization != "none":
        unbatched.load(str(demo_model_dir), quantization)  # type: ignore[arg-type]
    loaded = batched.current
    assert loaded is not None and loaded.decoder is not None and loaded.decoder.batch_exact
    assert exact_batching(loaded) and "bitwise as alone" in loaded.decoder_reason
    attention = (
        "(our own matmuls: by construction)"
        if native_step == "auto" and quantization == "none" and OUR_MATMULS and not onednn
        else "each row attends to its own keys, in C++"
        if native_step == "auto"
        else "the rows of a 64-column block attend in one call"
    )
    assert attention in loaded.decoder_reason
    assert unbatched.current is not None and unbatched.current.decoder is not None
    assert not unbatched.current.decoder.block_spans  # no batcher: rows attend to their keys, unmasked
    prompts = PROMPTS[:4]  # of different lengths: each row without padding

    expected = [unbatched.generate(prompt, greedy).continuations for prompt in prompts]
    got = concurrently([lambda prompt=prompt: batched.generate(prompt, greedy) for prompt in prompts])

    assert [completion.batch_size for completion in got] == [4, 4, 4, 4]
    assert [completion.continuations for completion in got] == expected


def test_lambda_has_no_batcher(demo_model_dir: Path) -> None:
    engine = engine_for(demo_model_dir, aws_lambda_function_name="llm-function")

    result = engine.generate("Hello", SamplingParams(max_new_tokens=3, temperature=0))

    assert engine.batcher is None and result.batch_size == 1


def test_batch_keys(served_engine: Engine, other_model_dir: Path) -> None:
    loaded = served_engine.current
    other = engine_for(other_model_dir).current
    assert loaded is not None and other is not None
    greedy = SamplingParams(max_new_tokens=5, temperature=0)

    def key(params: SamplingParams, model: Any = loaded) -> Any:
        return batch_key(model, params, reduced_precision=False)

    # Greedy rows ignore the sampling knobs and n; max_new_tokens is per row.
    assert key(greedy) == key(
        SamplingParams(max_new_tokens=9, temperature=0, top_k=3, num_return_sequences=2)
    )
    assert key(greedy) != key(SamplingParams(max_new_tokens=5, temperature=0, stop=("x",)))
    assert key(greedy) != key(SamplingParams(max_new_tokens=5, temperature=0, repetition_penalty=1.0))
    # Requests on two models (a swap between them) never share a batch.
    assert key(greedy) != key(greedy, other)
    # A seed or a time budget runs alone.
    assert key(SamplingParams(temperature=0.8, seed=3)) is None
    assert key(SamplingParams(temperature=0, max_time=1.0)) is None
    assert key(SamplingParams(temperature=0.8)) == key(SamplingParams(temperature=0.8, max_new_tokens=3))
    assert key(SamplingParams(temperature=0.8)) != key(
        SamplingParams(temperature=0.8, num_return_sequences=2)
    )


def test_the_repetition_penalty_ignores_left_padding() -> None:
    import torch

    torch.manual_seed(0)
    scores = torch.randn(1, 50)
    prompt = torch.tensor([[7, 3, 7, 11]])
    padded = torch.tensor([[0, 0, 0, 7, 3, 7, 11]])  # 0 is the pad id

    alone = PaddingAwareRepetitionPenalty(1.5, [0])(prompt, scores.clone())
    in_batch = PaddingAwareRepetitionPenalty(1.5, [3])(padded, scores.clone())

    assert torch.equal(alone, in_batch)
    assert alone[0, 0] == scores[0, 0]  # the pad id is untouched
    assert alone[0, 7] != scores[0, 7]  # a prompt token is penalized


def test_a_failed_batch_is_retried_one_request_at_a_time() -> None:
    calls: list[list[str]] = []

    def runner(_: Any, items: list[tuple[Any, Any]], *__: Any) -> list[str]:
        names = [encoded for encoded, _ in items]
        calls.append(names)
        if len(items) > 1:
            raise MemoryError("a batch this size does not fit")
        if names == ["bad"]:
            raise ValueError("this one request is broken")
        return [f"done {name}" for name in names]

    batcher: MicroBatcher[str] = MicroBatcher(runner, max_size=3, window_s=1.0)
    model = object()

    def submit(name: str) -> Any:
        try:
            return batcher.submit(model, name, SamplingParams(temperature=0), key="same")  # type: ignore[arg-type]
        except ValueError as exc:
            return str(exc)

    results = concurrently([lambda name=name: submit(name) for name in ("a", "bad", "b")])
    batcher.close()

    assert sorted(map(len, calls)) == [1, 1, 1, 3]  # the batch of three, then each alone
    assert sorted(results) == ["done a", "done b", "this one request is broken"]


def test_each_arrival_keeps_the_batch_open_one_more_window() -> None:
    sizes: list[int] = []

    def runner(_: Any, items: list[tuple[Any, Any]], *__: Any) -> list[str]:
        sizes.append(len(items))
        return [str(encoded) for encoded, _ in items]

    batcher: MicroBatcher[str] = MicroBatcher(runner, max_size=8, window_s=0.5)
    greedy = SamplingParams(temperature=0)

    def submit_at(delay: float) -> Any:
        time.sleep(delay)
        return batcher.submit(object(), delay, greedy, key="same")  # type: ignore[arg-type]

    # Staggered clients: the third arrives after the first window (0.5 s) but within one of the second.
    results = concurrently([lambda delay=delay: submit_at(delay) for delay in (0.0, 0.3, 0.6)])
    batcher.close()

    assert sizes == [3]
    assert results == ["0.0", "0.3", "0.6"]


def test_a_broken_runner_fails_its_requests_and_the_worker_lives_on() -> None:
    def runner(_: Any, items: list[tuple[Any, Any]], *__: Any) -> list[str]:
        if items[0][0] == "short":
            return []  # one result too few: a bug, not a hang
        return [str(encoded) for encoded, _ in items]

    batcher: MicroBatcher[str] = MicroBatcher(runner, max_size=4, window_s=0.0)
    greedy = SamplingParams(temperature=0)

    with pytest.raises(RuntimeError, match="0 results for 1 requests"):
        batcher.submit(object(), "short", greedy, key=None)  # type: ignore[arg-type]
    assert batcher.submit(object(), "fine", greedy, key=None) == "fine"  # type: ignore[arg-type]

    batcher.close()
    with pytest.raises(BatcherClosedError):
        batcher.submit(object(), "late", greedy, key=None)  # type: ignore[arg-type]


def test_a_cancelled_request_stops_its_row_and_the_batch_goes_on(unbatched: Engine, batched: Engine) -> None:
    # GIVEN two greedy requests that each run past a few tokens alone
    params = SamplingParams(max_new_tokens=24, temperature=0, repetition_penalty=1.0)
    assert unbatched.generate(PROMPTS[0], params).completion_tokens > 4
    expected = unbatched.generate(PROMPTS[2], params)
    cancel = CancelAfter(5)  # looked at three times before the batch generates, then once per token

    def cancelled() -> str:
        with pytest.raises(ClientClosedRequestError):
            batched.generate(PROMPTS[0], params, cancel)
        return "closed"

    # WHEN they share a batch and the first is cancelled after its second token
    closed, survivor = concurrently([cancelled, lambda: batched.generate(PROMPTS[2], params)])

    # THEN the cancelled row stopped at once, and the other finished with its full answer alone
    assert closed == "closed" and cancel.looks_left == -2
    assert isinstance(survivor, Completion) and survivor.batch_size == 2
    same_answer(survivor, expected)


def test_a_request_cancelled_before_its_batch_runs_is_left_out() -> None:
    seen: list[list[str]] = []

    def runner(_: Any, items: list[tuple[Any, Any]], *__: Any) -> list[str]:
        seen.append([encoded for encoded, _ in items])
        return [f"done {encoded}" for encoded, _ in items]

    batcher: MicroBatcher[str] = MicroBatcher(runner, max_size=2, window_s=1.0)
    greedy = SamplingParams(temperature=0)
    gone = Cancellation()
    gone.cancel()  # its client hung up while it waited for the batch

    def submit(name: str, cancel: Cancellation | None = None) -> str:
        try:
            return batcher.submit(object(), name, greedy, key="same", cancel=cancel)  # type: ignore[arg-type]
        except ClientClosedRequestError:
            return "closed"

    results = concurrently([lambda: submit("kept"), lambda: submit("gone", gone)])
    batcher.close()

    assert results == ["done kept", "closed"]
    assert seen == [["kept"]]  # the runner never saw it


@pytest.fixture(scope="module")
def short_context_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from function.demo_model import DemoModelSize, build_demo_model

    return build_demo_model(
        tmp_path_factory.mktemp("short") / "short_context", size=DemoModelSize(context_length=64)
    )


def test_a_batch_never_pads_and_decodes_past_the_context(short_context_dir: Path) -> None:
    alone = engine_for(short_context_dir, batch_max_size=1)
    together = engine_for(short_context_dir, batch_max_size=3, batch_window_ms=1000)
    assert alone.current is not None and alone.current.context_length == 64
    tokenizer = alone.current.tokenizer
    long_prompt = " ".join(["머신러닝 Python"] * 40)
    while len(tokenizer(long_prompt)["input_ids"]) > 45:
        long_prompt = long_prompt.rsplit(" ", 1)[0]
    # Each fits alone (about 45 + 10 and 5 + 24 of 64 positions); padded together they would need 69.
    requests = [
        ("Hello", SamplingParams(max_new_tokens=24, temperature=0)),
        (long_prompt, SamplingParams(max_new_tokens=10, temperature=0)),
        ("a", SamplingParams(max_new_tokens=10, temperature=0)),
    ]
    expected = [alone.generate(prompt, params) for prompt, params in requests]

    got = concurrently([lambda r=r: together.generate(*r) for r in requests])

    # Split in arrival order (which the threads decide): the long prompt and the long answer never
    # share a call, the short one joins whichever it fits beside.
    sizes = [completion.batch_size for completion in got]
    assert sorted(sizes) == [1, 2, 2] and 1 in (sizes[0], sizes[1])
    for completion, single in zip(got, expected, strict=True):
        same_answer(completion, single)


def test_a_cached_answer_made_no_generate_call(demo_model_dir: Path) -> None:
    engine = engine_for(demo_model_dir, response_cache_size=8)
    params = SamplingParams(max_new_tokens=4, temperature=0)

    first, second = engine.generate("Hello", params), engine.generate("Hello", params)

    assert (first.batch_size, second.batch_size) == (1, 0)
    assert first.continuations == second.continuations
