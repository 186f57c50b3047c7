"""``dsv3`` whose stdout reader goes away early (``dsv3 backends | head -1``) exits quietly: no
BrokenPipeError traceback, no "Exception ignored" at interpreter exit, exit status 141 (128 + SIGPIPE)."""

from __future__ import annotations

import os
import subprocess
import sys

from dsv3.cli import EXIT_BROKEN_PIPE


def _closed_reader(argv: list[str]) -> subprocess.CompletedProcess:
    """``python -m dsv3 ARGV`` writing into a pipe whose reader closed before the first byte: every write
    fails, as ``| head -1`` makes the writes after its first line fail, but without depending on timing."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dsv3", *argv],
            stdout=write_end,
            stderr=subprocess.PIPE,
            env={**os.environ, "DSV3_DISABLE_PLUGIN_AUTOLOAD": "1"},
        )
    finally:
        os.close(write_end)
    _, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(argv, proc.returncode, "", err.decode())


def test_closed_stdout_exits_quietly() -> None:
    result = _closed_reader(["backends"])
    # before: "Exception ignored in: <_io.TextIOWrapper name='<stdout>' ...> BrokenPipeError", exit 120
    assert result.stderr == ""
    assert result.returncode == EXIT_BROKEN_PIPE
