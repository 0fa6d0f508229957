"""The response cache: deterministic requests only, keyed by model and parameters, bounded, cleared."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from function.api.factory import create_app
from function.engine.deadline import deadline_in
from function.engine.engine import Engine
from function.engine.types import SamplingParams
from tests.support.settings import make_settings

GREEDY = SamplingParams(max_new_tokens=8, temperature=0)


def cached_engine(model_dir: Path, size: int = 8) -> Engine:
    engine = Engine(make_settings(model_path=str(model_dir), response_cache_size=size))
    engine.load_startup_model()
    return engine


def test_a_repeated_greedy_request_is_answered_from_the_cache(demo_model_dir: Path) -> None:
    engine = cached_engine(demo_model_dir)

    first = engine.generate("Python", GREEDY)
    second = engine.generate("Python", GREEDY)

    assert (engine.cache.misses, engine.cache.hits) == (1, 1)
    assert second.continuations == first.continuations and second.finish_reasons == first.finish_reasons
    assert second.generation_time == 0.0 and first.generation_time > 0


def test_only_deterministic_requests_are_cached(demo_model_dir: Path) -> None:
    engine = cached_engine(demo_model_dir)
    unseeded = SamplingParams(max_new_tokens=8, temperature=1.0)
    seeded = SamplingParams(max_new_tokens=8, temperature=1.0, seed=9)

    engine.generate("Python", unseeded)
    engine.generate("Python", unseeded)
    engine.generate("Python", seeded)
    again = engine.generate("Python", seeded)

    assert engine.cache.hits == 1 and len(engine.cache) == 1
    assert again.continuations == engine.generate("Python", seeded).continuations


def test_every_parameter_and_the_prompt_are_in_the_key(demo_model_dir: Path) -> None:
    engine = cached_engine(demo_model_dir)

    engine.generate("Python", GREEDY)
    engine.generate("Python", SamplingParams(max_new_tokens=9, temperature=0))
    engine.generate("Python", SamplingParams(max_new_tokens=8, temperature=0, stop=("x",)))
    engine.generate("Python!", GREEDY)
    engine.chat("Python", "", GREEDY)

    assert engine.cache.hits == 0 and len(engine.cache) == 5


def test_a_swap_clears_the_cache(demo_model_dir: Path, other_model_dir: Path) -> None:
    engine = cached_engine(demo_model_dir)
    engine.generate("Python", GREEDY)

    engine.load(str(other_model_dir))
    after = engine.generate("Python", GREEDY)

    assert engine.cache.hits == 0 and after.model_name == "other_model"


def test_bounded_least_recently_used(demo_model_dir: Path) -> None:
    engine = cached_engine(demo_model_dir, size=2)

    for prompt in ("a", "b", "a", "c"):  # "b" is the least recently used when "c" arrives
        engine.generate(prompt, GREEDY)
    engine.generate("a", GREEDY)
    engine.generate("b", GREEDY)

    assert len(engine.cache) == 2
    assert engine.cache.hits == 2  # the second "a", then "a" again; "b" had been evicted


def test_switched_off_and_time_cut_results_are_not_stored(demo_model_dir: Path, slow_model_dir: Path) -> None:
    off = cached_engine(demo_model_dir, size=0)
    off.generate("Python", GREEDY)
    off.generate("Python", GREEDY)
    assert off.cache.hits == 0 and len(off.cache) == 0

    slow = Engine(make_settings(model_path=str(slow_model_dir), response_cache_size=8, max_new_tokens=2000))
    slow.load_startup_model()
    with deadline_in(0.05):
        cut = slow.generate("Python", SamplingParams(max_new_tokens=1500, temperature=0))
    assert cut.finish_reasons == ["time"] and len(slow.cache) == 0


def test_through_http(demo_model_dir: Path) -> None:
    engine = cached_engine(demo_model_dir)
    client = TestClient(create_app(engine.settings, engine))
    body = {"prompt": "Python", "max_new_tokens": 6, "temperature": 0}

    first, second = client.post("/generate", json=body).json(), client.post("/generate", json=body).json()

    assert first["generated_text"] == second["generated_text"] and second["generation_time"] == 0.0
