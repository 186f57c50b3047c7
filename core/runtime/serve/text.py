"""Token ids to text, as they arrive: incremental detokenization and stop strings."""

from __future__ import annotations

from collections.abc import Callable

from ..text import IncrementalDecoder


class TextStream:
    """Deltas safe to send: held back while they might be the start of a stop string.

    ``add(ids) -> (delta, stopped)``: once a stop string appears, the text is cut where it begins
    (the stop string itself is not returned) and ``stopped`` is True.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str] | tuple[str, ...] = ()):
        self.decoder = IncrementalDecoder(decode)
        self.stop = tuple(stop)
        self.text = ""  # everything decoded so far (cut at a stop string once found)
        self.sent = 0  # characters of ``text`` already returned
        self.stopped = False

    def add(self, ids: list[int] | tuple[int, ...]) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        self.text += self.decoder.add(ids)
        return self._emit(final=False)

    def finish(self) -> str:
        """The rest of the text at the end of generation (a stop string may still cut it)."""
        if self.stopped:
            return ""
        self.text += self.decoder.flush()
        return self._emit(final=True)[0]

    def _emit(self, final: bool) -> tuple[str, bool]:
        cut = first_stop(self.text, self.stop, max(0, self.sent - max((len(s) for s in self.stop), default=0)))
        if cut is not None:
            self.text, self.stopped = self.text[:cut], True
            delta, self.sent = self.text[self.sent :], cut
            return delta, True
        end = len(self.text) if final else len(self.text) - held_back(self.text, self.stop)
        end = max(end, self.sent)
        delta, self.sent = self.text[self.sent : end], end
        return delta, False


def first_stop(text: str, stop: tuple[str, ...], start: int = 0) -> int | None:
    """Index where the earliest stop string begins in ``text[start:]`` (as an index into text), or None."""
    found = [i for i in (text.find(s, start) for s in stop) if i >= 0]
    return min(found) if found else None


def held_back(text: str, stop: tuple[str, ...]) -> int:
    """Length of the longest end of ``text`` that is a proper beginning of some stop string."""
    best = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:n]):
                best = n
                break
    return best
