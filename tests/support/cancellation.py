"""A fake cancellation that turns itself on, for the tests of cancellation."""

from __future__ import annotations

from function.engine.types import Cancellation


class CancelAfter(Cancellation):
    """Turns itself on at its (looks + 1)-th look. Generation looks once per token and row (and a few
    times before it starts), so how far `looks_left` went below zero tells how many more looks it took."""

    def __init__(self, looks: int) -> None:
        super().__init__()
        self.looks_left = looks

    @property
    def cancelled(self) -> bool:
        self.looks_left -= 1
        return self.looks_left < 0
