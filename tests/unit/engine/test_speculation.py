"""Prompt lookup decoding (function/engine/speculation.py): drafts from a row's own text, checked in
one step. The answers must be the one-token loop's, bitwise, on every decoder that drafts; drafts
must save steps where the text repeats; requests it can't serve exactly must not draft."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError
from transformers import LogitsProcessor, LogitsProcessorList

from function.engine.decode_loop import decode
from function.engine.engine import Engine
from function.engine.generation import generation_config, run_batch
from function.engine.speculation import PromptLookup
from function.engine.types import SamplingParams
from tests.support.cpu import OUR_MATMULS, onednn_matmuls
from tests.support.example_model import example_model_dir
from tests.support.settings import make_settings

STORY = "Once upon a time, in a small village at the edge of a great forest,"
ECHO = "Repeat after me: the cat sat on the mat. The cat sat on the mat."
PROMPTS = [
    STORY,
    "The quick brown fox jumps over the lazy dog and",
    "1, 2, 3, 4, 5, 6,",
    "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n",
    "How do I read a file in Python?",  # one token: the end
    ECHO,
]
DRAFTS = "greedy requests draft up to 3 tokens a step from their own text"


# --- the drafts -------------------------------------------------------------------------------


def test_a_draft_is_what_followed_the_latest_earlier_occurrence_of_the_last_tokens() -> None:
    lookup = PromptLookup([5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 5, 6, 7])

    assert lookup.draft(3) == [1, 2, 5]  # the latest of the two earlier "5 6 7"s
    assert lookup.draft(1) == [1]
    assert lookup.draft(0) == []


def test_three_tokens_match_before_two_and_one_token_never_drafts() -> None:
    # "6 7" last occurred before 3, "5 6 7" only before 8: the longer match wins
    assert PromptLookup([5, 6, 7, 8, 0, 6, 7, 3, 5, 6, 7]).draft(2) == [8, 0]
    assert PromptLookup([5, 6, 7, 8, 0, 6, 7, 3, 4, 6, 7]).draft(2) == [3, 4]  # no "4 6 7" before
    assert PromptLookup([1, 2, 3, 4, 3]).draft(4) == []  # only "3" occurred before
    assert PromptLookup([1, 2, 3]).draft(4) == []  # the last tokens themselves are no match


def test_drafts_follow_the_tokens_as_they_are_appended() -> None:
    lookup = PromptLookup([10, 11, 12, 13])
    for token in (14, 10, 11):
        lookup.append(token)

    assert lookup.draft(8) == [12, 13, 14, 10, 11]  # up to the row's end: no more than it holds


# --- the same answers -------------------------------------------------------------------------


def _engine(model_dir: Path, **settings: Any) -> Engine:
    engine = Engine(make_settings(model_path=str(model_dir), **settings))
    engine.load_startup_model()
    assert engine.current is not None and engine.current.decoder is not None
    return engine


@contextmanager
def one_token_at_a_time(engine: Engine) -> Iterator[None]:
    """The same decoder without drafts: the one-token loop the answers must equal. (A decoder with
    drafts was calibrated to round a row alike in calls of any size, which may pad a one-row call:
    its answers are compared with its own one-token loop, not with an uncalibrated decoder's.)"""
    decoder = engine.current.decoder if engine.current is not None else None
    assert decoder is not None and decoder.lookup_tokens == 3
    decoder.lookup_tokens = 0
    try:
        yield
    finally:
        decoder.lookup_tokens = 3


def _steps(engine: Engine, monkeypatch: pytest.MonkeyPatch, columns: list[int] | None = None) -> list[int]:
    """The rows of each decode step the engine's decoder runs, recorded as they happen; and the cache
    columns of their inputs into `columns`."""
    decoder = engine.current.decoder if engine.current is not None else None
    assert decoder is not None
    rows: list[int] = []
    real = decoder._step

    def counted(tokens: Any, *args: Any, **kwargs: Any) -> Any:
        rows.append(int(tokens.shape[0]))
        if columns is not None:
            columns.extend(args[0][:, 0].tolist())
        return real(tokens, *args, **kwargs)

    monkeypatch.setattr(decoder, "_step", counted)
    return rows


def plain_greedy(max_new_tokens: int, **options: Any) -> SamplingParams:
    """Greedy without a repetition penalty: what drafts serve."""
    return SamplingParams(max_new_tokens=max_new_tokens, temperature=0, repetition_penalty=1.0, **options)


@pytest.mark.parametrize(
    "settings",
    [
        {"batch_max_size": 1},  # as on Lambda: no batcher (our own matmuls where the CPU has AVX-512 BF16)
        {"batch_max_size": 4},  # a server's (the same matmuls, with a batcher)
        {"batch_max_size": 4, "onednn": True},  # oneDNN's matmuls, calibrated for batches
        {"batch_max_size": 1, "native_step": "false"},  # the layers stepped in Python
    ],
    ids=["alone", "server", "server-onednn", "python"],
)
def test_the_example_model_answers_as_without_drafts_in_fewer_steps(
    settings: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dict(settings)
    onednn = settings.pop("onednn", False)
    if onednn:
        onednn_matmuls(monkeypatch)
    engine = _engine(example_model_dir(), cpu_dtype="bfloat16", max_new_tokens=64, **settings)
    assert engine.current is not None and DRAFTS in engine.current.decoder_reason
    measured = onednn or not OUR_MATMULS or settings.get("native_step") == "false"
    how = "(measured" if measured else "(our own matmuls: by construction)"
    assert f"decode bitwise as alone {how}" in engine.current.decoder_reason, engine.current.decoder_reason
    greedy = plain_greedy(64)
    steps = _steps(engine, monkeypatch)

    with one_token_at_a_time(engine):
        expected = [engine.generate(prompt, greedy) for prompt in PROMPTS]
    without = list(steps)
    steps.clear()
    got = [engine.generate(prompt, greedy) for prompt in PROMPTS]

    assert [(c.continuations, c.finish_reasons, c.completion_tokens) for c in got] == [
        (c.continuations, c.finish_reasons, c.completion_tokens) for c in expected
    ]
    assert max(steps) > 1 and max(without) == 1 and len(steps) < len(without)
    steps.clear()
    echoed = engine.generate(ECHO, greedy)
    assert echoed.completion_tokens == 64 and len(steps) <= 32  # 2 tokens a step at least


def test_drafts_answer_as_a_decoder_without_them_where_rows_are_alike_in_any_call() -> None:
    """Our own matmuls (no batcher, AVX-512 BF16) round a row alike in any call by construction: no
    calibration pads a call, so PROMPT_LOOKUP_TOKENS=0 gives the same answers."""
    settings = {"cpu_dtype": "bfloat16", "batch_max_size": 1, "pack_tied_output": "false"}  # as on Lambda
    drafting = _engine(example_model_dir(), **settings)
    plain = _engine(example_model_dir(), prompt_lookup_tokens=0, **settings)
    assert plain.current is not None and "draft" not in plain.current.decoder_reason
    if "matmuls our own" not in plain.current.decoder_reason:
        pytest.skip("our own matmuls need AVX-512 BF16")
    assert drafting.current is not None
    assert "the rows of a step decode bitwise as alone (our own matmuls: by construction)" in (
        drafting.current.decoder_reason
    )
    greedy = plain_greedy(24)

    for prompt in PROMPTS:
        assert drafting.generate(prompt, greedy).continuations == plain.generate(prompt, greedy).continuations


@pytest.mark.parametrize("quantization", ["8bit", "4bit"])
def test_quantized_models_answer_as_without_drafts(
    demo_model_dir: Path, quantization: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine = _engine(demo_model_dir, cpu_dtype="bfloat16", batch_max_size=1)
    engine.load(str(demo_model_dir), quantization)  # type: ignore[arg-type]
    assert engine.current is not None and DRAFTS in engine.current.decoder_reason
    greedy = plain_greedy(24)
    prompts = ["Hello", "1 2 3 1 2 3 1 2 3", "a b a b a b a b"]
    with one_token_at_a_time(engine):
        expected = [engine.generate(prompt, greedy).continuations for prompt in prompts]
    steps = _steps(engine, monkeypatch)

    assert [engine.generate(prompt, greedy).continuations for prompt in prompts] == expected
    assert max(steps) > 1  # drafts were checked: the comparison is not one of two one-token loops


class Collected:
    """A streamer that keeps what it is given."""

    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, tokens: Any) -> None:
        self.puts.append(tokens.flatten().tolist())

    def end(self) -> None:
        self.ended = True


@pytest.mark.parametrize("native_step", ["auto", "false"])
def test_a_batch_with_its_own_limits_and_a_stop_string_answers_and_streams_as_without_drafts(
    native_step: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of different lengths and limits in one call, on a server's decoder (its layers stepped in
    C++, or in Python, where neighbouring cache rows attend in one call); one stops at the stop
    string, the others at their limits, and the streamer sees the same tokens in the same calls."""
    engine = _engine(example_model_dir(), cpu_dtype="bfloat16", batch_max_size=4, native_step=native_step)
    loaded = engine.current
    assert loaded is not None
    items = [
        (
            loaded.tokenizer(prompt, return_tensors="pt"),
            plain_greedy(limit, stop=("council",)),
        )
        for prompt, limit in [(PROMPTS[0], 64), (PROMPTS[1], 24), (PROMPTS[2], 7)]
    ]
    expected_stream, stream = Collected(), Collected()

    with one_token_at_a_time(engine):
        expected = run_batch(loaded, items, streamer=expected_stream)
    steps = _steps(engine, monkeypatch)
    got = run_batch(loaded, items, streamer=stream)

    assert got == expected
    assert max(steps) == 4  # three rows and a draft: the batch drafted
    assert [row.finish_reasons for row in got] == [["stop"], ["length"], ["length"]]
    assert stream.puts == expected_stream.puts and stream.ended and expected_stream.ended


def test_a_batch_steps_no_more_rows_than_it_began_with(monkeypatch: pytest.MonkeyPatch) -> None:
    """Six rows, four of which stop early: drafts take the places of rows that finished (or have
    tokens kept), never a seventh row (an 8-row step is bound by arithmetic: more rows cost what
    they save)."""
    engine = _engine(example_model_dir(), cpu_dtype="bfloat16", batch_max_size=8)
    loaded = engine.current
    assert loaded is not None
    rows = [
        (ECHO, 32),
        (PROMPTS[2], 4),
        (PROMPTS[4], 32),
        (PROMPTS[0], 6),
        ("a b c a b c a b c", 32),
        (ECHO, 2),
    ]
    items = [(loaded.tokenizer(prompt, return_tensors="pt"), plain_greedy(limit)) for prompt, limit in rows]
    steps = _steps(engine, monkeypatch)
    with one_token_at_a_time(engine):
        expected = run_batch(loaded, items)
    without = len(steps)
    steps.clear()

    assert run_batch(loaded, items) == expected
    assert max(steps) == 6 and len(steps) < without


@pytest.mark.parametrize("max_new_tokens", [1, 2, 3])
def test_drafts_stop_at_the_token_limit(max_new_tokens: int, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _engine(example_model_dir(), cpu_dtype="bfloat16", batch_max_size=1)
    greedy = plain_greedy(max_new_tokens)
    prompt = "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"
    with one_token_at_a_time(engine):
        expected = engine.generate(prompt, greedy)
    columns: list[int] = []
    rows = _steps(engine, monkeypatch, columns)

    got = engine.generate(prompt, greedy)

    assert got.continuations == expected.continuations and got.completion_tokens == max_new_tokens
    # The last token is never a step's input: the ones before it go to the columns after the prompt's.
    prompt_tokens = got.prompt_tokens
    assert sorted(set(columns)) == list(range(prompt_tokens, prompt_tokens + max_new_tokens - 1))
    assert max_new_tokens < 3 or max(rows) == 2  # a draft, cut to what the limit leaves


# --- where it does not draft -------------------------------------------------------------------


def test_a_repetition_penalty_applies_to_each_draft_token_in_its_own_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One request with a penalty drafts: each draft token's logits are penalized for the ids before
    it, the draft's own included, as the one-token loop penalizes them."""
    engine = _engine(example_model_dir(), cpu_dtype="bfloat16", batch_max_size=1, max_new_tokens=40)
    steps = _steps(engine, monkeypatch)
    prompts = ["List: apple, banana, cherry. Repeat the list: apple,", ECHO, PROMPTS[2]]  # they repeat
    for penalty in (1.1, 0.8):  # below 1 a penalty favours repeating
        params = SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=penalty)
        with one_token_at_a_time(engine):
            expected = [engine.generate(prompt, params) for prompt in prompts]
        steps.clear()

        got = [engine.generate(prompt, params) for prompt in prompts]

        assert [(c.continuations, c.completion_tokens) for c in got] == [
            (c.continuations, c.completion_tokens) for c in expected
        ]
        assert max(steps) > 1  # drafted


class Contexts(LogitsProcessor):  # type: ignore[misc]
    """A logits processor that changes nothing and keeps the ids of each row it is called with."""

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.seen += [tuple(row) for row in input_ids.tolist()]
        return scores

    def for_row(self, row: int) -> Contexts:
        """Its view for one row of a batch (`logits.row_processors`): it keeps every row alike."""
        return self


def test_a_processor_sees_each_kept_token_in_the_context_the_one_token_loop_gives_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every context the one-token loop processes a token's logits in, the drafting loop processes
    that token's logits in too: the ids before it, the draft tokens before it included."""
    engine = _engine(example_model_dir(), cpu_dtype="bfloat16", batch_max_size=1)
    loaded = engine.current
    assert loaded is not None and loaded.decoder is not None
    encoded = loaded.tokenizer(ECHO, return_tensors="pt")
    config = generation_config(loaded, plain_greedy(24))
    steps = _steps(engine, monkeypatch)
    runs = {}
    for drafts in (False, True):
        contexts = Contexts()
        with ExitStack() as stack:
            if not drafts:
                stack.enter_context(one_token_at_a_time(engine))
            ids = decode(
                loaded.decoder,
                encoded["input_ids"],
                encoded["attention_mask"],
                config,
                LogitsProcessorList([contexts]),
            )
        runs[drafts] = ids.tolist(), contexts.seen

    (expected, one_token), (got, drafting) = runs[False], runs[True]
    assert got == expected and len(one_token) == 24
    assert set(one_token) <= set(drafting)
    assert max(steps) > 1  # the drafting run drafted


def test_a_batch_with_a_repetition_penalty_drafts_each_row_in_its_own_context(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Rows of different lengths (left-padded ids): each row's penalty sees its own ids and drafts,
    blind to its padding, as the batch's penalty does in the one-token loop."""
    engine = _engine(example_model_dir(), cpu_dtype="bfloat16", batch_max_size=4, max_new_tokens=40)
    loaded = engine.current
    assert loaded is not None
    steps = _steps(engine, monkeypatch)
    prompts = ["List: apple, banana, cherry. Repeat the list: apple,", ECHO, PROMPTS[2]]
    for penalty in (1.1, 0.8):
        params = SamplingParams(max_new_tokens=40, temperature=0, repetition_penalty=penalty)
        items = [(loaded.tokenizer(prompt, return_tensors="pt"), params) for prompt in prompts]
        with one_token_at_a_time(engine):
            expected = run_batch(loaded, items)
        steps.clear()

        assert run_batch(loaded, items) == expected
        assert max(steps) > 3  # a row and its drafts beside the others: drafted


def test_sampled_requests_step_a_token_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """A sample is no argmax to check a draft against."""
    engine = _engine(example_model_dir(), cpu_dtype="bfloat16", batch_max_size=1)
    steps = _steps(engine, monkeypatch)

    sampled = engine.generate(ECHO, SamplingParams(max_new_tokens=16, temperature=0.8, seed=3))

    assert steps == [1] * (sampled.completion_tokens - 1)  # a step for each token after the first


def test_float32_batches_are_not_measured_so_they_do_not_draft(demo_model_dir: Path) -> None:
    engine = Engine(make_settings(model_path=str(demo_model_dir), cpu_dtype="float32", batch_max_size=4))
    engine.load_startup_model()

    assert engine.current is not None and engine.current.decoder is not None
    assert engine.current.decoder.lookup_tokens == 0
    assert engine.current.decoder_reason.endswith(
        "; no drafts (PROMPT_LOOKUP_TOKENS): the rows of a step were not measured bitwise as alone"
    )


@pytest.mark.parametrize("value", [-1, 17])
def test_prompt_lookup_tokens_is_bounded(value: int) -> None:
    with pytest.raises(ValidationError, match="prompt_lookup_tokens"):
        make_settings(prompt_lookup_tokens=value)
