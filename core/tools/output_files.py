"""Files a command is asked to write (``--json``, reports): whole or not at all, never over a non-file."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import Dsv3Error


def refuse_non_file(path: Path) -> None:
    """A Dsv3Error when ``path`` cannot take a report: it exists and is no regular file (the atomic
    write would replace a FIFO, a device such as ``/dev/stdout`` or a directory, destroying it), or
    its directory is missing or is itself a file."""
    if path.exists() and not path.is_file():
        raise Dsv3Error(f"{path}: not a regular file; give the path of a file to write the report to")
    parent = path.parent
    if not parent.is_dir():
        why = "is not a directory" if parent.exists() else "does not exist"
        raise Dsv3Error(f"{path}: {parent} {why}")


def write_atomically(path: str | Path, text: str) -> Path:
    """Write the whole file or nothing: a failure never leaves a half-written report or replaces the old one."""
    path = Path(path)
    refuse_non_file(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise Dsv3Error(f"{path}: cannot write ({exc.strerror})") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; a report is an ordinary file
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise Dsv3Error(f"{path}: cannot write ({exc.strerror})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
