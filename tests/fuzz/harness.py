"""The fuzz suite's machinery: a case's directories, running it (forked child or in-process), judging it.

Every case gets a directory of its own::

    root/io/       the child's stdout and stderr          } the run's own directories: anything
    root/home/     $HOME                                   } may be written here
    root/tmp/      $TMPDIR                                 }
    root/work/     the working directory, --out, --json    }
    root/markers/  where planted checkpoint code would write a file (a file here: code executed)
    root/sandbox/  the checkpoint and its neighbours: snapshotted before and after the case

A case is judged from its exit status and stderr (see :func:`judge`), the marker directory and the
sandbox snapshot. Children are forked from the test process (torch already imported: a case costs
~0.1 s, not the ~2 s of a fresh interpreter) with an address-space limit and a timeout; a child that
runs past it is killed with its whole process group (the chat-template renderer it may have started).
"""

from __future__ import annotations

import contextlib
import faulthandler
import hashlib
import io
import json
import logging
import os
import re
import resource
import select
import shutil
import signal
import stat
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

#: Total cases over all areas; each area takes its share (AREA_SHARES). Raise it for a longer run.
DEFAULT_CASES = 400
SEED = int(os.environ.get("DSV3_FUZZ_SEED", "17"))
CASES = int(os.environ.get("DSV3_FUZZ_CASES", str(DEFAULT_CASES)))
#: Seconds one case may take: the slowest clean cases (a chat template stopped at its 5 s render limit,
#: a renderer start on a loaded machine) take a few seconds; anything near this is a hang.
TIMEOUT_S = float(os.environ.get("DSV3_FUZZ_TIMEOUT", "30"))
#: Address space a child may take beyond the test process's own (4 GiB).
MEMORY_BUDGET = int(os.environ.get("DSV3_FUZZ_MEMORY", str(4 * 2**30)))
#: Largest file a child may write (RLIMIT_FSIZE): the tiny checkpoints' outputs are below 1 MB, and a
#: case that copies a 1 TiB sparse file must not fill the disk.
FILE_SIZE_LIMIT = 256 * 2**20
VERBOSE = os.environ.get("DSV3_FUZZ_VERBOSE") == "1"  # every case's outcome on stderr as it ends
AREA_SHARES = {"checkpoints": 0.28, "chat-templates": 0.07, "configs": 0.15, "cli": 0.2, "server": 0.3}

KINDS = ("error", "run", "traceback", "hang", "crash", "unclear", "code_executed", "touched_outside", "read_outside")
FAILURES = KINDS[2:]
TRACEBACK_MARKS = ("Traceback (most recent call last)", "Exception ignored in", "Fatal Python error")
OWN = ("io", "home", "tmp", "work")
# argparse's own one-line errors ("dsv3 eval perplexity: error: ...") after its usage text
_ARGPARSE_ERROR = re.compile(r"^dsv3(?: [\w-]+)*: error: ")
_DSV3_ERROR = "dsv3: error: "


def cases_for(area: str) -> int:
    """How many cases ``area`` runs at the DSV3_FUZZ_CASES setting (at least one)."""
    return max(1, round(CASES * AREA_SHARES[area]))


# ------------------------------------------------------------------------------------------ statistics
@dataclass
class Failure:
    area: str
    kind: str
    case: str
    reproducer: str
    detail: str


@dataclass
class Stats:
    """Counts per area and kind, and every failure with what reproduces it."""

    counts: dict[str, Counter] = field(default_factory=dict)
    wall_s: dict[str, float] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)

    def record(self, area: str, kinds: Iterable[str], case: str, reproducer: str, detail: str) -> None:
        c = self.counts.setdefault(area, Counter())
        c["cases"] += 1
        if VERBOSE:
            print(f"[fuzz {area}] {'+'.join(kinds)}: {case}\n    {detail[-300:]}", file=sys.__stderr__, flush=True)
        for kind in kinds:
            c[kind] += 1
            if kind in FAILURES:
                self.failures.append(Failure(area, kind, case, reproducer, detail))

    def failures_of(self, area: str) -> list[Failure]:
        return [f for f in self.failures if f.area == area]

    def table(self) -> str:
        cols = ("cases", *KINDS)
        heads = ("cases", "errors", "runs", "tracebacks", "hangs", "crashes", "unclear", "code", "outside", "read-out")
        lines = [
            f"dsv3 fuzz: seed {SEED}, DSV3_FUZZ_CASES={CASES}, timeout {TIMEOUT_S:g} s, "
            f"memory +{MEMORY_BUDGET / 2**30:g} GiB",
            f"{'area':<15}" + "".join(f"{h:>11}" for h in heads) + f"{'wall s':>9}",
        ]
        total = Counter()
        for area, c in self.counts.items():
            total.update(c)
            row = "".join(f"{c[k]:>11}" for k in cols)
            lines.append(f"{area:<15}{row}{self.wall_s.get(area, 0):>9.1f}")
        lines.append(f"{'all':<15}" + "".join(f"{total[k]:>11}" for k in cols) + f"{sum(self.wall_s.values()):>9.1f}")
        for f in self.failures:
            lines.append(f"FAIL {f.area} {f.kind}: {f.case}\n    reproduce: {f.reproducer}\n    {f.detail}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {
            "seed": SEED,
            "cases_setting": CASES,
            "timeout_s": TIMEOUT_S,
            "memory_budget_bytes": MEMORY_BUDGET,
            "areas": {a: {k: c[k] for k in ("cases", *KINDS)} for a, c in self.counts.items()},
            "wall_s": self.wall_s,
            "failures": [f.__dict__ for f in self.failures],
        }


STATS = Stats()


def assert_clean(area: str) -> None:
    """Fail the test of ``area`` with every failure it recorded."""
    found = STATS.failures_of(area)
    assert not found, f"{len(found)} failure(s) in {area}:\n" + "\n".join(
        f"{f.kind}: {f.case}\n  reproduce: {f.reproducer}\n  {f.detail}" for f in found
    )


# ------------------------------------------------------------------------------------------ directories
class CaseDirs:
    """The directories of one case under ``root`` (see the module docstring)."""

    def __init__(self, root: Path):
        self.root = root
        for name in (*OWN, "markers", "sandbox"):
            (root / name).mkdir(parents=True, exist_ok=True)
        self.io, self.home, self.tmp, self.work = (root / n for n in OWN)
        self.markers, self.sandbox = root / "markers", root / "sandbox"
        self.outside = self.sandbox / "outside"  # neighbours of the checkpoint: links lead here

    @property
    def marker(self) -> Path:
        """The file planted code would create."""
        return self.markers / "code-ran"

    def code_ran(self) -> list[str]:
        return sorted(p.name for p in self.markers.iterdir())

    def env(self) -> dict[str, str]:
        """The environment of a child: HOME and TMPDIR of its own, caches under that HOME."""
        env = {k: v for k, v in os.environ.items() if k not in _CACHE_VARS}
        env.update(HOME=str(self.home), TMPDIR=str(self.tmp), OMP_NUM_THREADS="1", PYTHONUTF8="1")
        return env

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


_CACHE_VARS = (
    "HF_HOME",
    "HF_HUB_CACHE",
    "TRANSFORMERS_CACHE",
    "HF_DATASETS_CACHE",
    "XDG_CACHE_HOME",
    "TORCHINDUCTOR_CACHE_DIR",
    "TRITON_CACHE_DIR",
)


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (not following links): type and mode, size, mtime, content digest / link target.

    Directories' mtimes are kept too: a file created and removed again inside still shows.
    FIFOs and devices are never opened.
    """
    out: dict[str, tuple] = {}
    st = os.lstat(root)
    out["."] = (st.st_mode, st.st_mtime_ns)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            rel = os.path.relpath(p, root)
            if stat.S_ISREG(st.st_mode):
                out[rel] = (st.st_mode, st.st_size, st.st_mtime_ns, _digest(p, st.st_size))
            elif stat.S_ISLNK(st.st_mode):
                out[rel] = (st.st_mode, os.readlink(p))
            else:
                out[rel] = (st.st_mode, st.st_mtime_ns)
    return out


def _digest(path: str, size: int, edge: int = 2**20) -> str:
    """sha1 of the file, or of its first and last MiB for a large (perhaps sparse) one."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        if size <= 4 * edge:
            h.update(f.read())
        else:
            h.update(f.read(edge))
            f.seek(size - edge)
            h.update(f.read(edge))
    return h.hexdigest()


def diff(before: dict, after: dict) -> list[str]:
    """What changed between two snapshots, one short entry per path."""
    changed = [f"+{p}" for p in after.keys() - before.keys()]
    changed += [f"-{p}" for p in before.keys() - after.keys()]
    changed += [f"~{p}" for p in before.keys() & after.keys() if before[p] != after[p]]
    return sorted(changed)


# ------------------------------------------------------------------------------------------ running
@dataclass
class Result:
    rc: int | None  # None: killed at the timeout; negative: killed by that signal
    stdout: str
    stderr: str
    seconds: float


def _address_space() -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def memory_limit() -> int:
    """The RLIMIT_AS of a child: this process's address space now plus MEMORY_BUDGET."""
    return _address_space() + MEMORY_BUDGET


def limit_memory(limit: int) -> None:
    """Set this process's soft RLIMIT_AS (the hard one stays: the chat renderer sets its own below it)."""
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else min(limit, hard), hard))


def _enter_child(dirs: CaseDirs, limit: int, stdin: Path | None, timeout: float | None = None) -> None:
    """In a freshly forked child: own process group, memory limit, files, environment, working directory."""
    os.setpgid(0, 0)
    limit_memory(limit)
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    fd_in = os.open(stdin or os.devnull, os.O_RDONLY)
    fd_out = os.open(dirs.io / "stdout", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    fd_err = os.open(dirs.io / "stderr", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    for fd, target in ((fd_in, 0), (fd_out, 1), (fd_err, 2)):
        os.dup2(fd, target)
        os.close(fd)
    # what a python interpreter would have on these descriptors (pytest replaced them in this process)
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8", errors="surrogateescape")
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8", errors="strict")
    sys.stderr = io.TextIOWrapper(
        io.FileIO(2, "w", closefd=False), encoding="utf-8", errors="backslashreplace", line_buffering=True
    )
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in getattr(logger, "handlers", ()):
            if type(handler) is logging.StreamHandler or "Capture" in type(handler).__name__:
                with contextlib.suppress(Exception):
                    handler.setStream(sys.stderr)
    faulthandler.enable(sys.stderr)
    if timeout is not None:  # a hang's stacks land in its stderr, shown with the case
        faulthandler.dump_traceback_later(max(1.0, timeout - 2), exit=False)
    os.environ.clear()
    os.environ.update(dirs.env())
    tempfile.tempdir = None
    os.chdir(dirs.work)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_DFL if sig != signal.SIGINT else signal.default_int_handler)


def _exit_code(target: Callable[[], int | None]) -> int:
    try:
        return int(target() or 0)
    except SystemExit as exc:  # argparse
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 70


def run_forked(
    target: Callable[[], int | None], dirs: CaseDirs, timeout: float = TIMEOUT_S, stdin: Path | None = None
) -> Result:
    """``target()`` in a forked child (see :func:`_enter_child`); its exit status, stdout and stderr."""
    limit = memory_limit()
    start = time.monotonic()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into pytest
        code = 71
        try:
            _enter_child(dirs, limit, stdin, timeout)
            code = _exit_code(target)
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
    rc = _wait(pid, timeout)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)  # whatever it left running (a chat renderer)
    return Result(rc, _read(dirs.io / "stdout"), _read(dirs.io / "stderr"), time.monotonic() - start)


def _wait(pid: int, timeout: float) -> int | None:
    """The child's exit code (negative: signal), or None after killing its group at ``timeout``."""
    fd = os.pidfd_open(pid)
    try:
        if not select.select([fd], [], [], timeout)[0]:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return None
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8", "backslashreplace")
    except FileNotFoundError:
        return ""


class CaseTimeout(BaseException):
    """Raised in the main thread when an in-process case runs past its time (a BaseException: not caught
    by ``except Exception`` in the code under test)."""


def run_inprocess(target: Callable[[], int | None], dirs: CaseDirs, timeout: float = TIMEOUT_S) -> Result:
    """``target()`` here, for cases that only parse and check arguments: stdout/stderr captured, HOME,
    TMPDIR and the working directory the case's own, interrupted by SIGALRM at ``timeout`` (a hang)."""
    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd, saved_tmp = dict(os.environ), os.getcwd(), tempfile.tempdir

    def alarm(signum, frame):
        raise CaseTimeout

    previous = signal.signal(signal.SIGALRM, alarm)
    start = time.monotonic()
    rc: int | None
    try:
        os.environ.update(dirs.env())
        for k in _CACHE_VARS:
            os.environ.pop(k, None)
        tempfile.tempdir = None
        os.chdir(dirs.work)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = _exit_code(target)
        except CaseTimeout:
            rc = None
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        signal.signal(signal.SIGALRM, previous)
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        tempfile.tempdir = saved_tmp
    return Result(rc, out.getvalue(), err.getvalue(), time.monotonic() - start)


# ------------------------------------------------------------------------------------------ judging
def judge(result: Result, run_codes: tuple[int, ...] = (0,)) -> tuple[str, str]:
    """(kind, detail) of a CLI run: its exit status and stderr against the house rules.

    error: exit 2 and the last stderr line is the one ``dsv3: error: ...`` line (or argparse's one
    ``dsv3 CMD: error: ...`` line); run: an exit status in ``run_codes``; traceback: a Python traceback
    anywhere in stderr; hang / crash: killed at the timeout / by a signal; unclear: anything else
    (a multi-line error, another exit status).
    """
    tail = _tail(result.stderr)
    if any(mark in result.stderr for mark in TRACEBACK_MARKS):
        return "traceback", tail
    if result.rc is None:
        return "hang", f"killed after {result.seconds:.0f} s; {_tail(result.stderr, 3000)}"
    if result.rc < 0:
        return "crash", f"killed by signal {-result.rc}; {tail}"
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    if result.rc == 2 and lines:
        last = lines[-1]
        ours = [line for line in lines if line.startswith(_DSV3_ERROR)]
        if last.startswith(_DSV3_ERROR) and len(ours) == 1 and len(last) > len(_DSV3_ERROR):
            return "error", last
        if _ARGPARSE_ERROR.match(last) and "usage:" in result.stderr:
            return "error", last
    if result.rc in run_codes:
        return "run", tail
    return "unclear", f"exit {result.rc}; {tail}"


def _tail(text: str, chars: int = 600) -> str:
    text = text.strip()
    return text if len(text) <= chars else "..." + text[-chars:]


@dataclass
class Verdict:
    kinds: list[str]
    detail: str


def check_case(
    dirs: CaseDirs, before: dict, result: Result, run_codes: tuple[int, ...] = (0,), refuse: str | None = None
) -> Verdict:
    """Every kind a finished case falls under: judge()'s, plus code executed, files touched outside the
    run's own directories, and ``refuse`` (why the input must be refused) when it ran instead."""
    kind, detail = judge(result, run_codes)
    kinds = [kind]
    if refuse and kind == "run":
        kinds.append("read_outside")
        detail = f"ran although it must refuse: {refuse}; {detail}"
    ran = dirs.code_ran()
    if ran:
        kinds.append("code_executed")
        detail = f"planted code wrote {ran}; {detail}"
    changed = diff(before, snapshot(dirs.sandbox))
    if changed:
        kinds.append("touched_outside")
        detail = f"changed outside the run's directories: {changed[:8]}; {detail}"
    return Verdict(kinds, detail)


def shell_quote(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def dump(value: object) -> str:
    """JSON text of a fuzz value (NaN/Infinity as Python writes them; lone surrogates escaped)."""
    return json.dumps(value)


def run_batch(
    items: list, work: Callable[[object], dict], dirs: CaseDirs, timeout: float = TIMEOUT_S
) -> list[dict | None]:
    """``work(item)`` for every item in one forked child (so what it starts once, such as the chat-template
    renderer, serves them all), each answer a JSON line; None for an item that ran past ``timeout`` (its
    child is killed with its group, and a new child goes on with the next item)."""
    answers: list[dict | None] = []
    while len(answers) < len(items):
        answers += _batch_child(items, len(answers), work, dirs, timeout)
    return answers


def _batch_child(items: list, first: int, work, dirs: CaseDirs, timeout: float) -> list[dict | None]:
    limit = memory_limit()
    r, w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.close(r)
            _enter_child(dirs, limit, None)
            for item in items[first:]:
                try:
                    answer = work(item)
                except BaseException as exc:  # the work itself must not fail: say so as a traceback
                    answer = {"kind": "traceback", "detail": "".join(traceback.format_exception(exc))[-2000:]}
                os.write(w, json.dumps(answer).encode() + b"\n")
        except BaseException:
            traceback.print_exc()
            code = 70
        finally:
            os._exit(code)
    os.close(w)
    got: list[dict | None] = []
    pending = b""
    deadline = time.monotonic() + timeout
    try:
        while first + len(got) < len(items):
            while b"\n" in pending:
                line, _, pending = pending.partition(b"\n")
                got.append(json.loads(line))
                deadline = time.monotonic() + timeout
            if first + len(got) >= len(items):
                break
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                got.append(None)  # this item hangs: the next child starts after it
                break
            chunk = os.read(r, 1 << 16)
            if not chunk:  # the child died mid-item
                got.append({"kind": "crash", "detail": f"the child ended: {_tail(_read(dirs.io / 'stderr'))}"})
                break
            pending += chunk
    finally:
        os.close(r)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return got
