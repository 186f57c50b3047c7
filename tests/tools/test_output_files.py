"""Report files (--json of conformance, parity, eval, bench): written whole, or one line and nothing."""

from __future__ import annotations

import errno
import os

import pytest

from dsv3 import cli
from dsv3.errors import Dsv3Error
from dsv3.tools.output_files import write_atomically


def test_a_report_under_a_regular_file_is_one_line(tmp_path, capsys):
    """Found by tests/fuzz: `--json plain.txt/sub` ended in mkstemp's NotADirectoryError traceback."""
    (tmp_path / "plain.txt").write_text("mine")
    report = tmp_path / "plain.txt" / "sub"
    argv = ["conformance", "--backend", "cpu_ref", "--quick", "--op", "rms_norm", "--json", str(report)]
    assert cli.main(argv) == 2  # dsv3's exit status for a Dsv3Error
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dsv3: error: {report}: {tmp_path / 'plain.txt'} is not a directory"]
    assert (tmp_path / "plain.txt").read_text() == "mine"


def test_missing_directory_and_non_file_targets_are_refused(tmp_path):
    with pytest.raises(Dsv3Error, match="does not exist"):
        write_atomically(tmp_path / "no" / "report.json", "{}")
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(Dsv3Error, match="not a regular file"):
        write_atomically(tmp_path / "fifo", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo"]


def test_a_failed_write_is_one_line_and_the_old_report_stays(tmp_path, monkeypatch):
    old = write_atomically(tmp_path / "report.json", "old")

    def full_disk(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(Dsv3Error, match="report.json: cannot write \\(No space left on device\\)"):
        write_atomically(old, "new")
    assert old.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_a_report_gets_the_mode_of_an_ordinary_file(tmp_path):
    """mkstemp makes 0600; the report is chmod-ed to 0666 minus the umask, as open() would."""
    old = os.umask(0o022)
    try:
        path = write_atomically(tmp_path / "report.json", "{}")
    finally:
        os.umask(old)
    assert (path.stat().st_mode & 0o777) == 0o644
