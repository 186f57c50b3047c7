"""Checks on text that comes from users and checkpoints before any tokenizer sees it."""

from __future__ import annotations

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
