"""The bad-input table: every bound at its limit (accepted) and past it (422 naming field and limit).

Sent over HTTP by tests/unit/api/test_schemas.py and through Lambda events by tests/unit/aws/test_handler.py.
"""

from __future__ import annotations

from typing import Any

from tests.support.settings import TEST_MAX_NEW_TOKENS, TEST_MAX_SEQUENCES

QUICK = {"max_new_tokens": 2}

# (route, body, expected status, field named in the error or None, limit or None)
CASES: list[tuple[str, dict[str, Any], int, str | None, Any]] = [
    # max_new_tokens: 1..MAX_NEW_TOKENS
    ("/generate", {"prompt": "a", "max_new_tokens": 1}, 200, None, None),
    ("/generate", {"prompt": "a", "max_new_tokens": 0}, 422, "max_new_tokens", 1),
    ("/generate", {"prompt": "a", "max_new_tokens": TEST_MAX_NEW_TOKENS}, 200, None, None),
    (
        "/generate",
        {"prompt": "a", "max_new_tokens": TEST_MAX_NEW_TOKENS + 1},
        422,
        "max_new_tokens",
        TEST_MAX_NEW_TOKENS,
    ),
    (
        "/chat",
        {"instruction": "a", "max_new_tokens": TEST_MAX_NEW_TOKENS + 1},
        422,
        "max_new_tokens",
        TEST_MAX_NEW_TOKENS,
    ),
    ("/chat", {"instruction": "a", "max_new_tokens": 0}, 422, "max_new_tokens", 1),
    # temperature >= 0, 0 is greedy
    ("/generate", {"prompt": "a", "temperature": 0, **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "temperature": -0.01, **QUICK}, 422, "temperature", 0),
    ("/chat", {"instruction": "a", "temperature": -1, **QUICK}, 422, "temperature", 0),
    # top_p in (0, 1]
    ("/generate", {"prompt": "a", "top_p": 1.0, **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "top_p": 1.01, **QUICK}, 422, "top_p", 1),
    ("/generate", {"prompt": "a", "top_p": 0.01, **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "top_p": 0, **QUICK}, 422, "top_p", 0),
    ("/chat", {"instruction": "a", "top_p": 1.5, **QUICK}, 422, "top_p", 1),
    # top_k >= 0
    ("/generate", {"prompt": "a", "top_k": 0, **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "top_k": -1, **QUICK}, 422, "top_k", 0),
    # repetition_penalty > 0
    ("/generate", {"prompt": "a", "repetition_penalty": 0.01, **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "repetition_penalty": 0, **QUICK}, 422, "repetition_penalty", 0),
    # num_return_sequences: 1..MAX_NUM_RETURN_SEQUENCES
    ("/generate", {"prompt": "a", "num_return_sequences": TEST_MAX_SEQUENCES, **QUICK}, 200, None, None),
    (
        "/generate",
        {"prompt": "a", "num_return_sequences": TEST_MAX_SEQUENCES + 1, **QUICK},
        422,
        "num_return_sequences",
        TEST_MAX_SEQUENCES,
    ),
    ("/generate", {"prompt": "a", "num_return_sequences": 0, **QUICK}, 422, "num_return_sequences", 1),
    # greedy with several sequences: identical copies (the schema can't express a cross-field rule)
    ("/generate", {"prompt": "a", "num_return_sequences": 2, "do_sample": False, **QUICK}, 200, None, None),
    # prompt / instruction not empty
    ("/generate", {"prompt": "", **QUICK}, 422, "prompt", 1),
    ("/generate", {"prompt": "  \n", **QUICK}, 422, "prompt", None),
    ("/generate", {**QUICK}, 422, "prompt", None),
    ("/chat", {"instruction": "", **QUICK}, 422, "instruction", 1),
    ("/chat", {"input": "only input", **QUICK}, 422, "instruction", None),
    # stop: up to 4 non-empty strings
    ("/generate", {"prompt": "a", "stop": ["1", "2", "3", "4"], **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "stop": ["1", "2", "3", "4", "5"], **QUICK}, 422, "stop", 4),
    ("/generate", {"prompt": "a", "stop": [""], **QUICK}, 422, "stop.0", 1),
    # seed >= 0
    ("/generate", {"prompt": "a", "seed": 0, **QUICK}, 200, None, None),
    ("/generate", {"prompt": "a", "seed": -1, **QUICK}, 422, "seed", 0),
    # wrong types and unknown fields
    ("/generate", {"prompt": "a", "max_new_tokens": "many"}, 422, "max_new_tokens", None),
    ("/generate", {"prompt": "a", "max_tokens": 3}, 422, "max_tokens", None),
]

# Readable test ids: route, the field named in the error (or ok), the status, the row.
CASE_IDS = [f"{c[0]}-{c[3] or 'ok'}-{c[2]}-{i}" for i, c in enumerate(CASES)]
