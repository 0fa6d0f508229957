"""`function.app:app` for uvicorn, and `create_app` for everything else.

The app is built on first access (uvicorn's import), not when this module is imported, so tests
and tools can import `create_app` without loading a model.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from function.api.factory import create_app

__all__ = ["app", "create_app"]

app: FastAPI  # declared, not assigned: built by __getattr__ on first access


def __getattr__(name: str) -> Any:
    """`function.app:app`: the process-wide settings and engine, built once, on first access."""
    if name == "app":
        global app
        app = create_app()
        return app
    raise AttributeError(name)
