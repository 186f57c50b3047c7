"""Text in and out: checks on text from users and checkpoints before any tokenizer sees it, and
incremental detokenization of generated tokens."""

from __future__ import annotations

from collections.abc import Callable

from ..errors import Dsv3Error


def check_text(text: object, what: str) -> str:
    """``text`` if it is a str that UTF-8 can encode, else a Dsv3Error naming ``what``.

    Python holds invalid UTF-8 from a command line (and an unpaired ``\\ud800``-``\\udfff`` JSON
    escape) as lone surrogates, which no tokenizer accepts.
    """
    if not isinstance(text, str):
        raise Dsv3Error(f"{what} must be text, not {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise Dsv3Error(
            f"{what} is not valid Unicode: a lone surrogate {text[exc.start]!r} at character {exc.start} "
            "(invalid UTF-8, or an unpaired \\ud800-\\udfff escape)"
        ) from None
    return text


class IncrementalDecoder:
    """Text deltas for a growing list of token ids, each decoded with a little context.

    ``decode(ids[prefix:])`` minus ``decode(ids[prefix:read])`` is the new text; a delta ending in
    U+FFFD (an incomplete multi-byte character) waits for the next token. Joined, the deltas are
    ``decode(ids)`` for ordinary tokenizers (byte-level BPE, SentencePiece, word-level).
    """

    def __init__(self, decode: Callable[[list[int]], str]):
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, ids: list[int] | tuple[int, ...]) -> str:
        self.ids.extend(ids)
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (at the end of the sequence)."""
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        self.prefix = self.read = len(self.ids)
        return after[len(before) :]
