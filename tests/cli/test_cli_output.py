"""Where ``dsv3``'s output goes. A stdout reader that goes away early (``dsv3 backends | head -1``):
dsv3 exits quietly, no BrokenPipeError traceback, no "Exception ignored" at interpreter exit, exit
status 141 (128 + SIGPIPE). A terminal that shows stdout and stderr together: ``dsv3 run``'s output
ends its line before the summary on stderr starts, so the two never share a line."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dsv3.cli import EXIT_BROKEN_PIPE
from dsv3.cli import main as dsv3_main
from tests.helpers import one_torch_thread


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


class _Terminal:
    """stdout and stderr of one terminal: both streams' writes land in one text, in order."""

    def __init__(self, shown: list[str]):
        self.shown = shown

    def write(self, text: str) -> int:
        self.shown.append(text)
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


single_thread = pytest.fixture(one_torch_thread)


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("extra", [["--output-format", "jsonl"], ["--output-format", "text"], ["--prompt", "y"]])
def test_run_output_ends_its_line_before_the_summary(extra: list[str], monkeypatch) -> None:
    shown: list[str] = []
    monkeypatch.setattr(sys, "stdout", _Terminal(shown))
    monkeypatch.setattr(sys, "stderr", _Terminal(shown))
    argv = ["run", "--prompt", "def f(", "--max-new-tokens", "4", "--temperature", "0", "--dtype", "float32", *extra]
    assert dsv3_main(argv) == 0
    screen = "".join(shown)
    summary = screen.index("dsv3: ")  # "dsv3: N tokens in S s (R tokens/s)", the first line on stderr after loading
    assert summary > 0 and screen[summary - 1] == "\n", repr(screen[max(0, summary - 80) : summary + 20])
    assert screen.endswith("tokens/s)\n")
