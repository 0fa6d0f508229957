"""Requests choose among the named adapters served beside the base (ADAPTERS)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from function.engine.batching import batch_key
from function.engine.engine import Engine
from function.engine.types import SamplingParams
from function.errors import UnknownAdapterError
from tests.support.adapters import peft_greedy_text
from tests.support.settings import make_settings

PROMPT = "머신러닝을 설명하세요"
TOKENS = 10
GREEDY = SamplingParams(max_new_tokens=TOKENS, temperature=0, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def multi_engine(demo_model_dir: Path, adapter_dir: Path, second_adapter_dir: Path) -> Engine:
    settings = make_settings(
        model_path=str(demo_model_dir),
        adapters={"sql": str(adapter_dir), "chat": str(second_adapter_dir)},
        response_cache_size=64,
    )
    engine = Engine(settings)
    engine.load_startup_model()
    return engine


def test_each_request_gets_the_adapter_it_names_and_peft_agrees(
    multi_engine: Engine, demo_model_dir: Path, adapter_dir: Path, second_adapter_dir: Path
) -> None:
    adapters = {"sql": adapter_dir, "chat": second_adapter_dir}

    answers = {
        name: multi_engine.generate(PROMPT, replace(GREEDY, adapter=name)).continuations[0]
        for name in (None, "sql", "chat")
    }

    assert len(set(answers.values())) == 3
    for name, text in answers.items():
        assert text == peft_greedy_text(demo_model_dir, adapters, PROMPT, TOKENS, adapter=name)


def test_without_an_adapter_the_base_answers_untouched(multi_engine: Engine, served_engine: Engine) -> None:
    with_adapters_loaded = multi_engine.generate(PROMPT, GREEDY).continuations[0]

    assert with_adapters_loaded == served_engine.generate(PROMPT, GREEDY).continuations[0]


def test_an_unknown_adapter_is_named_with_the_known_ones(multi_engine: Engine, served_engine: Engine) -> None:
    with pytest.raises(UnknownAdapterError) as refused:
        multi_engine.generate(PROMPT, replace(GREEDY, adapter="nope"))

    assert refused.value.field == "adapter" and refused.value.status == 422
    assert "'nope'" in refused.value.message and "sql, chat" in refused.value.message
    with pytest.raises(UnknownAdapterError, match="base model only"):
        served_engine.generate(PROMPT, replace(GREEDY, adapter="sql"))


def test_the_response_cache_keeps_adapters_apart(multi_engine: Engine) -> None:
    multi_engine.cache.clear()
    first = {name: multi_engine.generate(PROMPT, replace(GREEDY, adapter=name)) for name in (None, "sql")}

    again = {name: multi_engine.generate(PROMPT, replace(GREEDY, adapter=name)) for name in (None, "sql")}

    for name in (None, "sql"):
        assert again[name].batch_size == 0  # from the cache
        assert again[name].continuations == first[name].continuations
    assert first[None].continuations != first["sql"].continuations


def test_requests_batch_only_with_the_same_adapter(multi_engine: Engine) -> None:
    loaded = multi_engine.require_model()

    keys = {
        name: batch_key(loaded, replace(GREEDY, adapter=name), reduced_precision=False)
        for name in (None, "sql")
    }

    assert keys[None] is not None and keys["sql"] is not None and keys[None] != keys["sql"]


def test_streams_use_the_adapter_too(multi_engine: Engine) -> None:
    params = replace(GREEDY, adapter="chat")

    streamed = "".join(item for item in multi_engine.stream(PROMPT, params) if isinstance(item, str))

    assert streamed == multi_engine.generate(PROMPT, params).continuations[0]


def test_openai_model_names_select_an_adapter_or_the_base(multi_engine: Engine) -> None:
    assert multi_engine.adapter_named("sql") == "sql"
    assert multi_engine.adapter_named("final_model") is None
    assert multi_engine.adapter_named("gpt-4o") is None
    assert multi_engine.adapter_named(None) is None


def test_concurrent_requests_on_different_adapters_each_get_their_own(multi_engine: Engine) -> None:
    from concurrent.futures import ThreadPoolExecutor

    names = [None, "sql", "chat"] * 3
    alone = {
        name: multi_engine.generate(PROMPT, replace(GREEDY, adapter=name)).continuations[0] for name in names
    }
    multi_engine.cache.clear()

    with ThreadPoolExecutor(max_workers=len(names)) as pool:
        together = list(pool.map(lambda n: multi_engine.generate(PROMPT, replace(GREEDY, adapter=n)), names))

    assert [result.continuations[0] for result in together] == [alone[name] for name in names]
    assert any(result.batch_size > 1 for result in together)  # same-adapter requests did share calls
