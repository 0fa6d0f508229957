"""Settings for tests: small limits, no `.env`, nothing a determinism test would trip over."""

from __future__ import annotations

import tempfile
from typing import Any

from function.config import Settings

# Small limits keep every at-the-limit request quick on a 2-core CI machine.
TEST_MAX_NEW_TOKENS = 24
TEST_MAX_SEQUENCES = 3


def make_settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "max_new_tokens": TEST_MAX_NEW_TOKENS,
        "max_num_return_sequences": TEST_MAX_SEQUENCES,
        "cpu_dtype": "float32",
        # Loads may come from the temp directory the tests build models in.
        "allowed_model_paths": [tempfile.gettempdir()],
        "rate_limit": None,  # off unless a test sets one
        "response_cache_size": 0,  # determinism tests must generate twice; the cache has tests of its own
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)  # type: ignore[call-arg]
