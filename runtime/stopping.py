"""Cut streamed text at the first stop string, holding back only what could still become one.

The output joins to ``text[:earliest stop]`` (or the whole text) however the text was
split into pieces; the stop string itself is never emitted.
"""

from __future__ import annotations

from typing import Sequence

from kiln.ir.errors import ConfigError


class StopStringMatcher:
    """Streams text through, stopping at the earliest occurrence of any stop string."""

    def __init__(self, stops: Sequence[str]):
        if isinstance(stops, str):
            stops = (stops,)
        stops = tuple(stops)
        if not all(isinstance(stop, str) and stop for stop in stops):
            raise ConfigError(f"stop strings must be non-empty strings, got {stops!r}; remove the empty ones")
        self._stops = stops
        self._longest = max((len(stop) for stop in stops), default=0)
        self._held = ""
        self._stopped = False

    @property
    def stopped(self) -> bool:
        """True once a stop string has been seen (by ``feed`` or ``flush``)."""
        return self._stopped

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add a piece of text; return (text safe to show now, whether a stop string ended it)."""
        if self._stopped:
            return "", True
        if not self._stops:
            return piece, False
        text = self._held + piece
        match = self._earliest_match(text)
        open_start = self._earliest_open_start(text, match if match is not None else len(text))
        if match is not None and open_start is None:
            self._held = ""
            self._stopped = True
            return text[:match], True
        # Either nothing matched yet, or a longer stop that began earlier may still
        # complete and would win; keep everything from the earliest such start.
        safe = open_start if open_start is not None else len(text)
        self._held = text[safe:]
        return text[:safe], False

    def flush(self) -> str:
        """End of stream: return the held text, cut at a stop string if one is complete."""
        if self._stopped:
            return ""
        text, self._held = self._held, ""
        match = self._earliest_match(text)
        if match is None:
            return text
        self._stopped = True
        return text[:match]

    def _earliest_match(self, text: str) -> int | None:
        positions = [position for position in (text.find(stop) for stop in self._stops) if position >= 0]
        return min(positions) if positions else None

    def _earliest_open_start(self, text: str, before: int) -> int | None:
        """Earliest index < before where the rest of text is a proper prefix of some stop."""
        # Only the last (longest - 1) characters can begin an unfinished stop string.
        for start in range(max(0, len(text) - self._longest + 1), min(before, len(text))):
            tail = text[start:]
            if any(len(stop) > len(tail) and stop.startswith(tail) for stop in self._stops):
                return start
        return None
