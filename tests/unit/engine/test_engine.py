"""The engine on real demo models: generation, prompts, loads and swaps, the process-wide engine."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from function.engine.engine import Engine, get_engine, reset_engine
from function.engine.prompts import build_chat_prompt
from function.engine.types import SamplingParams, StreamEnd
from function.errors import (
    ContextLengthExceededError,
    ModelLoadError,
    ModelLoadInProgressError,
)
from tests.support.models import write_pickle_only_model
from tests.support.settings import make_settings

GREEDY = SamplingParams(max_new_tokens=16, temperature=0, repetition_penalty=1.0)


def test_greedy_output_is_deterministic(served_engine: Engine) -> None:
    first = served_engine.generate("Python이란 무엇인가요?", GREEDY)
    second = served_engine.generate("Python이란 무엇인가요?", GREEDY)

    assert first.continuations == second.continuations
    assert first.continuations[0]  # the random model does produce text
    assert first.prompt_tokens > 0
    assert first.finish_reasons[0] in ("length", "stop")


def test_identical_concurrent_greedy_requests_return_identical_text(served_engine: Engine) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(
            pool.map(lambda _: served_engine.generate("머신러닝", GREEDY).continuations[0], range(6))
        )

    assert len(set(results)) == 1


def test_length_finish_reason_and_usage(served_engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=0, repetition_penalty=1.0)
    result = served_engine.generate("Hello", params)

    if result.finish_reasons[0] == "length":
        assert result.completion_tokens == 8
    else:  # EOS came first: fewer tokens, reason stop
        assert result.completion_tokens <= 8


def test_num_return_sequences(served_engine: Engine) -> None:
    params = SamplingParams(max_new_tokens=8, num_return_sequences=3, seed=7)
    result = served_engine.generate("Python", params)

    assert len(result.continuations) == 3
    assert len(result.finish_reasons) == 3
    assert len(set(result.continuations)) > 1  # sampled independently


def test_seed_makes_sampling_reproducible(served_engine: Engine) -> None:
    def sample(seed: int | None) -> list[str]:
        params = SamplingParams(
            max_new_tokens=12, temperature=1.0, top_k=0, top_p=1.0, seed=seed, num_return_sequences=2
        )
        return served_engine.generate("Python이란?", params).continuations

    assert sample(123) == sample(123)
    assert sample(123) != sample(124)


def test_stop_string_cuts_the_text_before_it(served_engine: Engine) -> None:
    # GIVEN the greedy continuation without stop strings
    full = served_engine.generate("Python이란 무엇인가요?", GREEDY).continuations[0]
    stop = full[4:6]
    assert stop.strip(), "the demo model's continuation should have text after position 4"

    # WHEN a stop string from its middle is given
    result = served_engine.generate(
        "Python이란 무엇인가요?",
        SamplingParams(
            max_new_tokens=16, temperature=0, repetition_penalty=1.0, stop=(stop, "never-produced")
        ),
    )

    # THEN the text ends right before its first occurrence, with finish_reason stop
    assert result.continuations[0] == full[: full.index(stop)]
    assert result.finish_reasons == ["stop"]


def test_streamed_deltas_with_stop_strings_add_up_to_the_non_streamed_text(served_engine: Engine) -> None:
    # GIVEN a stop string taken from the middle of the unstopped greedy continuation
    prompt = "Python이란 무엇인가요?"
    full = served_engine.generate(prompt, GREEDY).continuations[0]
    stop = full[4:6]
    assert stop.strip(), "the demo model's continuation should have text after position 4"
    # AND the non-streamed greedy answer with it (and a longer stop string, so more text is held back)
    params = SamplingParams(
        max_new_tokens=16, temperature=0, repetition_penalty=1.0, stop=(stop, "never-produced")
    )
    expected = served_engine.generate(prompt, params)
    assert expected.finish_reasons == ["stop"]

    # WHEN the same request is streamed
    items = list(served_engine.stream(prompt, params))

    # THEN the deltas add up to the non-streamed text (nothing of the stop string was sent), and the
    # stream ends with the same finish reason and token count
    *deltas, end = items
    assert all(isinstance(delta, str) for delta in deltas)
    assert "".join(str(delta) for delta in deltas) == expected.continuations[0]
    assert isinstance(end, StreamEnd) and end.finish_reason == "stop"
    assert end.completion_tokens == expected.completion_tokens


def test_time_budget_finish_reason(slow_model_dir: Path) -> None:
    engine = Engine(make_settings(model_path=str(slow_model_dir), max_new_tokens=2000))
    engine.load_startup_model()

    result = engine.generate("Python", SamplingParams(max_new_tokens=1500, temperature=0, max_time=0.05))

    assert result.finish_reasons == ["time"]
    assert result.completion_tokens < 1500


def test_context_length_boundary(served_engine: Engine) -> None:
    # GIVEN a prompt that leaves fewer than MAX_NEW_TOKENS (24) tokens of the 2048 context free
    loaded = served_engine.current
    assert loaded is not None
    words = 2030
    prompt = " ".join(["Python"] * words)
    prompt_tokens = len(loaded.tokenizer(prompt)["input_ids"])
    while prompt_tokens > 2047:  # trim until at least one new token fits
        words -= 1
        prompt = " ".join(["Python"] * words)
        prompt_tokens = len(loaded.tokenizer(prompt)["input_ids"])
    room = loaded.context_length - prompt_tokens
    assert 1 <= room <= 24

    # WHEN exactly the room is asked for, THEN it generates
    served_engine.generate(prompt, SamplingParams(max_new_tokens=room, temperature=0))

    # WHEN one more is asked for, THEN it is refused before generating, naming both numbers and the limit
    with pytest.raises(ContextLengthExceededError) as error:
        served_engine.generate(prompt, SamplingParams(max_new_tokens=room + 1, temperature=0))
    assert error.value.limit == loaded.context_length
    assert f"the prompt has {prompt_tokens} tokens and max_new_tokens is {room + 1}" in error.value.message


def test_instruction_format_without_chat_template(served_engine: Engine) -> None:
    loaded = served_engine.current
    assert loaded is not None and not loaded.chat_template

    plain = build_chat_prompt(loaded, "머신러닝을 설명하세요", "", served_engine.settings)
    with_input = build_chat_prompt(loaded, "Translate", "안녕하세요", served_engine.settings)

    assert plain == "### Instruction:\n머신러닝을 설명하세요\n\n### Response:\n"
    assert with_input == "### Instruction:\nTranslate\n\n### Input:\n안녕하세요\n\n### Response:\n"
    result = served_engine.chat("머신러닝을 설명하세요", "", GREEDY)
    assert result.prompt == plain


def test_instruction_template_setting_replaces_the_format(demo_model_dir: Path) -> None:
    settings = make_settings(
        model_path=str(demo_model_dir), instruction_template="<user>{instruction}</user>\n"
    )
    engine = Engine(settings)
    engine.load_startup_model()

    assert engine.chat("hi", "", GREEDY).prompt == "<user>hi</user>\n"


def test_chat_template_is_used_when_the_tokenizer_has_one(chat_model_dir: Path) -> None:
    engine = Engine(make_settings(model_path=str(chat_model_dir)))
    engine.load_startup_model()

    result = engine.chat("Explain Python", "briefly", GREEDY)

    assert result.prompt == "[INST] Explain Python\n\nbriefly [/INST]"
    # and the setting can turn it off
    fallback = Engine(make_settings(model_path=str(chat_model_dir), use_chat_template=False))
    fallback.load_startup_model()
    assert fallback.chat("Explain Python", "", GREEDY).prompt.startswith("### Instruction:")


def test_failed_load_keeps_the_old_model_serving(fresh_engine: Engine, tmp_path: Path) -> None:
    before = fresh_engine.generate("Python", GREEDY).continuations
    truncated = tmp_path / "truncated_model"
    truncated.mkdir()
    source = fresh_engine.current.path  # type: ignore[union-attr]
    for item in Path(source).iterdir():
        data = item.read_bytes()
        (truncated / item.name).write_bytes(data[: len(data) // 2] if item.suffix == ".safetensors" else data)

    for bad_path in (str(tmp_path / "missing"), str(truncated), "gpt2", "org/repo"):
        with pytest.raises(ModelLoadError):
            fresh_engine.load(bad_path)
        assert fresh_engine.current is not None
        assert fresh_engine.current.path == source
        assert fresh_engine.generate("Python", GREEDY).continuations == before


def test_pickle_checkpoints_are_refused_without_unpickling(fresh_engine: Engine, tmp_path: Path) -> None:
    marker = tmp_path / "pickle-ran"
    model_dir = write_pickle_only_model(tmp_path / "pickled", marker)

    with pytest.raises(ModelLoadError) as error:
        fresh_engine.load(str(model_dir))

    assert "safetensors" in error.value.message
    assert "save_pretrained" in error.value.message  # says how to convert
    assert not marker.exists()
    assert fresh_engine.current is not None


def test_a_load_racing_another_gets_busy(slow_model_dir: Path, demo_model_dir: Path) -> None:
    engine = Engine(make_settings())
    first = threading.Thread(target=engine.load, args=(str(slow_model_dir),))
    first.start()
    deadline = time.monotonic() + 10
    while not engine.loading and time.monotonic() < deadline:
        time.sleep(0.001)

    with pytest.raises(ModelLoadInProgressError):
        engine.load(str(demo_model_dir))
    first.join()

    assert engine.current is not None and engine.current.path == str(slow_model_dir)


def test_requests_in_flight_finish_on_the_model_they_started_with(
    slow_model_dir: Path, other_model_dir: Path
) -> None:
    engine = Engine(make_settings(model_path=str(slow_model_dir), max_new_tokens=400))
    engine.load_startup_model()
    params = SamplingParams(max_new_tokens=400, temperature=0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        in_flight = pool.submit(engine.generate, "Python", params)
        deadline = time.monotonic() + 10
        while not engine.generating and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.generating

        engine.load(str(other_model_dir))  # swap while the request runs

        assert in_flight.result().model_name == "slow_model"
    assert engine.generate("Python", GREEDY).model_name == "other_model"


def test_swaps_under_a_stream_of_requests(demo_model_dir: Path, other_model_dir: Path) -> None:
    # GIVEN the greedy text of each model
    greedy = SamplingParams(max_new_tokens=12, temperature=0, repetition_penalty=1.0)
    engine = Engine(make_settings(model_path=str(demo_model_dir)))
    engine.load_startup_model()
    expected = {"final_model": engine.generate("Python", greedy).continuations[0]}
    engine.load(str(other_model_dir))
    expected["other_model"] = engine.generate("Python", greedy).continuations[0]
    assert expected["final_model"] != expected["other_model"]

    # WHEN four clients generate while the model is swapped back and forth
    results: list[tuple[str, str]] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            result = engine.generate("Python", greedy)
            results.append((result.model_name, result.continuations[0]))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for thread in threads:
        thread.start()
    for path in (demo_model_dir, other_model_dir) * 3:
        engine.load(str(path))
        seen, deadline = len(results), time.monotonic() + 30
        while len(results) < seen + 4 and time.monotonic() < deadline:  # let answers arrive between swaps
            time.sleep(0.005)
    stop.set()
    for thread in threads:
        thread.join()

    # THEN every answer is entirely one model's
    assert len(results) >= 24
    assert {name for name, _ in results} == {"final_model", "other_model"}
    for name, text in results:
        assert text == expected[name]


@pytest.mark.parametrize(
    ("quantization", "decoder", "layer_class"),
    [
        ("8bit", "transformers", "Int8Linear"),
        ("4bit", "transformers", "Int4Linear"),
        # Our decoder fuses them: q/k/v and gate/up as one int8 / int4 matmul each.
        ("8bit", "auto", "Int8Projection"),
        ("4bit", "auto", "Int4Projection"),
    ],
)
def test_quantized_loads_work_on_cpu(
    demo_model_dir: Path, quantization: str, decoder: str, layer_class: str
) -> None:
    engine = Engine(make_settings(decoder=decoder))
    loaded, _ = engine.load(str(demo_model_dir), quantization)  # type: ignore[arg-type]

    assert loaded.quantization == quantization
    layers = {type(module).__name__ for module in loaded.model.modules()}
    assert layer_class in layers
    assert "Linear" not in layers  # nothing left unquantized
    result = engine.generate("Python이란?", GREEDY)
    assert result.completion_tokens > 0


def test_greedy_with_several_sequences_returns_identical_copies(served_engine: Engine) -> None:
    result = served_engine.generate(
        "Python", SamplingParams(max_new_tokens=6, temperature=0, num_return_sequences=3)
    )

    assert len(result.continuations) == 3 and len(set(result.continuations)) == 1
    assert len(result.finish_reasons) == 3


@pytest.mark.parametrize(
    ("temperature", "repetition_penalty"), [(5.0, 5e-324), (1e-300, 1.1), (1e300, 1e300)]
)
def test_extreme_but_valid_sampling_values_still_generate(
    served_engine: Engine, temperature: float, repetition_penalty: float
) -> None:
    params = SamplingParams(
        max_new_tokens=4, temperature=temperature, repetition_penalty=repetition_penalty, seed=1
    )

    assert served_engine.generate("0.1.0", params).completion_tokens > 0


def test_get_engine_refuses_other_settings_instead_of_ignoring_them() -> None:
    # GIVEN the process-wide engine, built with one set of settings (no model: nothing to load)
    reset_engine()
    try:
        first = get_engine(make_settings())

        # WHEN it is asked for again with the same settings, and then with other ones
        again = get_engine(make_settings())

        # THEN the same engine comes back, and other settings are an error, not silently dropped
        assert again is first
        with pytest.raises(RuntimeError, match="other settings"):
            get_engine(make_settings(max_new_tokens=7))
    finally:
        reset_engine()


# Admission.


SAMPLED = SamplingParams(max_new_tokens=24, temperature=1.0, top_k=0, top_p=1.0, seed=0)
INVALID_UTF8_PROMPT = "Python이란 무엇인가요?"  # with SAMPLED, the random model writes invalid UTF-8 early


def test_a_replacement_character_stop_string_ends_generation_where_it_appears(served_engine: Engine) -> None:
    # GIVEN a continuation whose text holds "\ufffd" (invalid UTF-8 from the random model)
    full = served_engine.generate(INVALID_UTF8_PROMPT, SAMPLED)
    text = full.continuations[0]
    assert "\ufffd" in text and full.completion_tokens == 24

    # WHEN "\ufffd" is a stop string, streamed and not
    params = replace(SAMPLED, stop=("\ufffd",))
    cut = served_engine.generate(INVALID_UTF8_PROMPT, params)
    *deltas, end = served_engine.stream(INVALID_UTF8_PROMPT, params)

    # THEN the text is cut before it, generation stopped there (transformers' byte matching let it run
    # to max_new_tokens), and the stream sends the same text and figures
    assert cut.continuations == [text[: text.index("\ufffd")]] and cut.finish_reasons == ["stop"]
    assert cut.completion_tokens < full.completion_tokens
    assert "".join(str(delta) for delta in deltas) == cut.continuations[0]
    assert isinstance(end, StreamEnd) and (end.finish_reason, end.completion_tokens) == (
        "stop",
        cut.completion_tokens,
    )


# Cancellation.

# Greedy from "Python", the slow model's text falls into a loop and never writes its end token: 2000 tokens
# run their whole length unless stopped (a sampled text could end early by chance).
