"""Stop strings over a stream of text deltas: what may be sent now, and what is held back.

Pure (no model, no threads), so every case is unit-tested. The deltas a stream sends add up to
the same text a non-streamed request returns: text that could begin a stop string is held until
it can't, and nothing at or after a stop string is ever sent.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator

from function.engine.types import StreamEnd


def first_stop(text: str, stops: tuple[str, ...]) -> int | None:
    """Where the earliest stop string in `text` begins, or None."""
    positions = [index for stop in stops if (index := text.find(stop)) >= 0]
    return min(positions) if positions else None


class StopHoldBack:
    """Feed it the deltas as they arrive; it returns the part that is safe to send."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        # A tail shorter than the longest stop string may be the start of one.
        self._hold = max((len(stop) for stop in stops), default=1) - 1
        self._received = ""
        self._sent = 0
        self._stopped = False

    @property
    def sent(self) -> str:
        """Everything returned so far."""
        return self._received[: self._sent]

    def feed(self, delta: str) -> str:
        """Take the next delta; return the text that can be sent now ("" when nothing can)."""
        if self._stopped:
            return ""
        self._received += delta
        cut = first_stop(self._received, self.stops)
        if cut is not None:
            self._stopped = True
            safe = cut
        else:
            safe = len(self._received) - self._hold
        if safe <= self._sent:
            return ""
        out = self._received[self._sent : safe]
        self._sent = safe
        return out

    def finish(self, final: str) -> str:
        """The rest to send, so that everything sent adds up to `final` (the non-streamed text, cut at
        its first stop string). "" when the sent text already is `final`, or is not a prefix of it."""
        sent = self.sent
        if final.startswith(sent) and len(final) > len(sent):
            return final[len(sent) :]
        return ""


class TextStream(Iterator[str | StreamEnd]):
    """A stream's events (text deltas, then a StreamEnd) with the name of the model that generates them,
    known before the first delta. `close` gives the stream up: its generation stops at the next token."""

    def __init__(self, events: Generator[str | StreamEnd, None, None], model_name: str) -> None:
        self._events = events
        self.model_name = model_name

    def __iter__(self) -> TextStream:
        return self

    def __next__(self) -> str | StreamEnd:
        return next(self._events)

    def close(self) -> None:
        self._events.close()
