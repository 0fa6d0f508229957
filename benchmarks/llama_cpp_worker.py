"""llama-cpp-python on request, for `benchmarks.llama_cpp`: run by the benchmark-only `.venv-llamacpp`'s Python,
so the project's environment never imports llama_cpp. Standard library and llama_cpp only. Run it with
`python -P`: otherwise its own folder, which holds `benchmarks/llama_cpp.py`, shadows the llama_cpp package.

One JSON object a line on stdin, one answer a line on stdout:
  {"op": "load", "name": "bf16", "path": "x.gguf", "threads": 2, "extra_bufts": true, "lookup": 0}  -> {"ok": true}
  {"op": "run", "name": "bf16", "prompt": "...", "tokens": 128}  -> {"tokens": 128, "seconds": 1.9, "text": "..."}
A run starts from an empty KV cache (the prompt is evaluated in full, as our engine does) and is greedy.
`lookup` N > 0: llama-cpp-python's prompt lookup decoding (`LlamaPromptLookupDecoding`, n-grams of up to 3
tokens, N tokens drafted), as our PROMPT_LOOKUP_TOKENS drafts.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import llama_cpp
import llama_cpp.llama_cpp as low_level
from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

MODELS: dict[str, Any] = {}


def without_extra_buffer_types() -> None:
    """Model parameters with `use_extra_bufts` off (the weight repacking, AMX's included): llama.cpp issue
    20824, the AMX extra buffer type crashes on Q4_1 prefill. `Llama` has no argument for it."""
    default_params = low_level.llama_model_default_params

    def patched() -> Any:
        params = default_params()
        params.use_extra_bufts = False
        return params

    low_level.llama_model_default_params = patched  # type: ignore[assignment]


def load(request: dict[str, Any]) -> dict[str, Any]:
    if not request.get("extra_bufts", True):
        without_extra_buffer_types()
    threads = int(request["threads"])
    lookup = int(request.get("lookup", 0))
    draft = LlamaPromptLookupDecoding(max_ngram_size=3, num_pred_tokens=lookup) if lookup else None
    MODELS[request["name"]] = llama_cpp.Llama(
        draft_model=draft,
        model_path=request["path"],
        n_ctx=1024,
        n_threads=threads,
        n_threads_batch=threads,
        seed=0,
        verbose=False,
    )
    return {"ok": True}


def run(request: dict[str, Any]) -> dict[str, Any]:
    model = MODELS[request["name"]]
    model.reset()  # no prompt prefix reused from the last run
    started = time.perf_counter()
    output = model.create_completion(
        request["prompt"],
        max_tokens=int(request["tokens"]),
        temperature=0.0,
        repeat_penalty=1.0,
    )
    seconds = time.perf_counter() - started
    return {
        "tokens": int(output["usage"]["completion_tokens"]),
        "seconds": seconds,
        "text": output["choices"][0]["text"],
    }


def main() -> None:
    handlers = {"load": load, "run": run}
    for line in sys.stdin:
        request = json.loads(line)
        try:
            answer = handlers[request["op"]](request)
        except Exception as exc:  # the benchmark prints it and goes on
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
