"""AWS Lambda entry point: `function.handler.handler` (the Dockerfile's CMD).

Importing this module is the cold start: it starts the S3 fetch of `MODEL_PATH` (in a child process
into the `/tmp` cache, or in a thread into memory with WEIGHTS_IN_MEMORY), imports torch and
transformers meanwhile, builds the process-wide engine (which loads
the fetched model) and the handler over it (`function.aws.lambda_handler.build_handler`).
"""

from __future__ import annotations

import time

_IMPORTS_STARTED = time.perf_counter()

# The S3 fetch needs only boto3: start it now, so the download overlaps the torch and transformers
# imports below instead of following them. The engine's load picks up this prefetch.
from function.config import get_settings  # noqa: E402
from function.weights.memory import prefetch_into_memory  # noqa: E402
from function.weights.prefetch import prefetch  # noqa: E402

settings = get_settings()
for path in (settings.model_path, settings.base_model_path, *settings.adapters.values()):
    if path and path.startswith("s3://"):  # the model, an adapter's base and the named adapters: at once
        if settings.fetch_into_memory:  # into this process's memory (SnapStart): a thread, not a child
            prefetch_into_memory(path, settings.model_cache_dir)
        else:
            prefetch(path, settings.model_cache_dir)

import logging  # noqa: E402

from function.aws.lambda_handler import build_handler  # noqa: E402
from function.aws.secrets import with_secret_keys  # noqa: E402
from function.engine.engine import get_engine  # noqa: E402
from function.engine.telemetry import resident_mb  # noqa: E402
from function.weights.loading import import_runtime  # noqa: E402

import_runtime()  # torch and transformers' model-loading modules, while the weights download
IMPORTS_SECONDS = time.perf_counter() - _IMPORTS_STARTED

base_settings = settings
settings = with_secret_keys(base_settings)  # API keys from Secrets Manager: at init, again after a restore
logging.basicConfig(level=settings.log_level.upper())
logging.getLogger().setLevel(settings.log_level.upper())
engine = get_engine(
    settings,
    startup_phases={
        "began": _IMPORTS_STARTED,
        "imports_s": round(IMPORTS_SECONDS, 4),
        "rss_after_imports_mb": resident_mb(),
    },
)
handler = build_handler(settings, engine, refresh_settings=lambda: with_secret_keys(base_settings))
