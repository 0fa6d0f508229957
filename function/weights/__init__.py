"""From `MODEL_PATH` to a loaded model: S3 addresses and fetching, integrity, resolving a path to a
checked local directory, loading, the allow-list of runtime loads, and publishing.

Depends only on `function.config`, `function.errors` and `function.engine.types`.
"""
