"""Streaming: ``Engine.stream`` yields text as tokens are decoded, and joined it is ``Engine.generate``'s
text; ``dsv3 run --interactive`` on a terminal (a pty) shows a reply while it is still being decoded,
confirms ``/clear``, lists the commands at ``/help``, stops a reply at Ctrl-C and goes on, and exits 0.

The pty tests never rely on timing: the "gated" child blocks every decode forward on a pipe that the
test feeds one byte per step, so the test knows exactly how far decoding can have got when it looks
at the screen. Timeouts only guard against a hung child.
"""

from __future__ import annotations

import codecs
import os
import pty
import select
import signal
import sys
import time

import pytest

import dsv3
from dsv3.errors import Dsv3Error
from dsv3.runtime import engine as engine_module
from dsv3.runtime.generate import DecodeStep, SamplingParams, generate, generate_steps

MAX_NEW = 24
PROMPTS = ("def f(", "hello", "the", "import os\n")
SAMPLINGS = ({"temperature": 0.0}, {"temperature": 1.0, "seed": 3}, {"temperature": 0.8, "top_p": 0.9, "seed": 11})


@pytest.fixture(scope="module")
def engine() -> dsv3.Engine:
    return dsv3.load(dtype="float32", progress=False)  # the embedded model


def _count_forwards(engine: dsv3.Engine, monkeypatch) -> list[int]:
    """Count main-model forwards (the prefill and each decode or verify step) in calls[0]."""
    calls = [0]
    forward = engine.model.forward

    def counted(*args, **kwargs):
        calls[0] += 1
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.model, "forward", counted)
    return calls


# ----------------------------------------------------------------- the Python API
@pytest.mark.parametrize("mtp", [0, 1])
@pytest.mark.parametrize("sampling", SAMPLINGS, ids=["greedy", "sampled", "top-p"])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_streamed_text_is_the_generated_text(engine, prompt, sampling, mtp):
    want = engine.generate([prompt], MAX_NEW, mtp=mtp, **sampling)[0]
    stream = engine.stream(prompt, MAX_NEW, mtp=mtp, **sampling)
    pieces = []
    while True:
        try:
            pieces.append(next(stream))
        except StopIteration as end:
            got = end.value
            break
    assert "".join(pieces) == want.text
    assert len(pieces) > 1 and all(pieces)  # it came in pieces, none of them empty
    assert (got.text, got.token_ids, got.finish_reason) == (want.text, want.token_ids, want.finish_reason)
    assert (got.mtp is None) == (mtp == 0)


def test_generate_is_built_on_the_steps(engine):
    params = SamplingParams(MAX_NEW, 1.0, 1.0, 5, engine.eos_ids)
    ids = [engine.encode(p) for p in PROMPTS]
    out = generate(engine.model, ids, params)
    steps = list(generate_steps(engine.model, ids, params))
    assert all(s.finish_reasons is None for s in steps[:-1]) and steps[-1].finish_reasons == out.finish_reasons
    assert [sum((s.tokens[i] for s in steps), []) for i in range(len(ids))] == out.token_ids
    graph_counters = {"graph_replays", "eager_steps", "captured_buckets", "failed_buckets"}  # dsv3.runtime.graphs
    assert set(out.stats) == {"ttft_s", "decode_s"} | graph_counters == set(steps[-1].stats)


@pytest.mark.parametrize("mtp", [0, 1])
def test_first_piece_comes_before_the_last_token_is_decoded(engine, monkeypatch, mtp):
    calls = _count_forwards(engine, monkeypatch)
    seen = [calls[0] for _ in engine.stream("def f(", MAX_NEW, temperature=0.0, mtp=mtp)]
    # "def f(" goes on with "f" (a whole character): its piece comes right after the prefill
    assert seen[0] == 1
    assert calls[0] > 1 and seen[-1] == calls[0]
    if mtp == 0:
        assert calls[0] == MAX_NEW  # the prefill and MAX_NEW - 1 decode steps: no forward after the last token


def test_stream_checks_its_arguments_when_called(engine):
    with pytest.raises(Dsv3Error, match="max_position_embeddings"):
        engine.stream("hello", max_new_tokens=engine.cfg.max_position_embeddings)
    with pytest.raises(Dsv3Error, match="temperature"):
        engine.stream("hello", temperature=-1.0)


class _ByteTokenizer:
    """Token id n is the byte n: a character of several bytes arrives over several steps."""

    eos_token_id = None
    chat_template = None

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode("utf-8", errors="replace")


def test_a_character_split_over_tokens_comes_out_whole(engine, monkeypatch):
    text = "a中é!"  # 中 is three bytes, é two
    data = text.encode()

    def steps(model, prompts, params, enforce_eager=False):
        for i, b in enumerate(data):
            last = i == len(data) - 1
            yield DecodeStep([[b]], ["length"] if last else None, {} if last else None)

    monkeypatch.setattr(engine_module, "generate_steps", steps)
    byte_engine = dsv3.Engine(engine.model, _ByteTokenizer())
    pieces = list(byte_engine.stream([65], max_new_tokens=len(data)))
    assert pieces == ["a", "中", "é", "!"]  # never a U+FFFD standing for bytes still to come


# ----------------------------------------------------------------- the terminal
ARGS = ["run", "--interactive", "--max-new-tokens", str(MAX_NEW), "--temperature", "0", "--dtype", "float32"]

# Runs ``python -m dsv3 ARGS`` with every decode forward (one new token against the cache) waiting
# for a byte on the pipe GATE_FD.
GATED = """
import os, runpy, sys
from dsv3.model.graph import Transformer
gate, forward = int(os.environ["GATE_FD"]), Transformer.forward
def gated(self, tokens, positions=None, cache=None, rows=None):
    if cache is not None and tokens.shape[1] == 1:
        os.read(gate, 1)
    return forward(self, tokens, positions, cache, rows)
Transformer.forward = gated
sys.argv = ["dsv3", *sys.argv[1:]]
runpy.run_module("dsv3", run_name="__main__")
"""


class Terminal:
    """A child process on a pty: what it shows (carriage returns dropped) and what is typed into it."""

    def __init__(self, argv: list[str], gate: int | None = None):
        env = {**os.environ, "DSV3_DISABLE_PLUGIN_AUTOLOAD": "1"}
        if gate is not None:
            os.set_inheritable(gate, True)
            env["GATE_FD"] = str(gate)
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: become the program at once
            try:
                os.execve(sys.executable, [sys.executable, *argv], env)
            finally:
                os._exit(127)
        self.screen = ""
        self.mark = 0  # where the part of the screen being waited on begins
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def type(self, text: str) -> None:
        self.mark = len(self.screen)
        os.write(self.fd, text.encode())

    def wait_for(self, needle: str, timeout: float = 60.0) -> str:
        """Read until ``needle`` is on the screen after the mark; the screen from the mark to it."""
        deadline = time.monotonic() + timeout
        while needle not in self.screen[self.mark :]:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} never appeared; screen ends {self.screen[-1500:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                assert self._read(), f"the program ended before {needle!r}; screen ends {self.screen[-1500:]!r}"
        shown = self.screen[self.mark :]
        return shown[: shown.index(needle) + len(needle)]

    def _read(self) -> bool:
        try:
            data = os.read(self.fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            data = b""
        self.screen += self._utf8.decode(data).replace("\r", "")
        return bool(data)

    def exit_status(self, timeout: float = 60.0) -> int:
        """Read to the end; the exit status."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], deadline - time.monotonic())[0] and not self._read():
                break
        while True:  # a child that does not exit fails the test instead of hanging it
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                break
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                os.waitpid(self.pid, 0)
                self.pid = 0
                raise AssertionError(f"the child did not exit within {timeout:g} s; screen:\n{self.screen[-2000:]}")
            time.sleep(0.05)
        self.pid = 0
        return os.waitstatus_to_exitcode(status)

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


def _reply(engine: dsv3.Engine, line: str, monkeypatch) -> tuple[list[str], list[int], int]:
    """The reply the CLI gives ``line`` (raw completion, greedy): its pieces, the decode forwards made
    before each piece came, and the decode forwards in all."""
    with monkeypatch.context() as m:
        calls = _count_forwards(engine, m)
        pieces, before = [], []
        stream = engine.stream(line, MAX_NEW, temperature=0.0, chat=False)
        for piece in stream:
            pieces.append(piece)
            before.append(calls[0] - 1)
        return pieces, before, calls[0] - 1


@pytest.fixture
def gated(tmp_path):
    read_end, write_end = os.pipe()
    term = Terminal(["-c", GATED, *ARGS], gate=read_end)
    os.close(read_end)
    yield term, (lambda n: os.write(write_end, b"s" * n) if n else None)
    term.close()
    os.close(write_end)


@pytest.mark.e2e
def test_interactive_streams_clears_helps_stops_and_exits(engine, gated, monkeypatch):
    term, release = gated
    hello, hello_before, hello_steps = _reply(engine, "hello", monkeypatch)
    the, the_before, _ = _reply(engine, "the", monkeypatch)
    hello_text = "".join(hello)
    term.wait_for(">>> ")

    # the first piece is on the screen while the next decode step waits at the gate
    term.type("hello\n")
    term.wait_for("hello\n")
    term.mark = len(term.screen)
    release(hello_before[0])
    term.wait_for(hello[0])
    shown = term.screen[term.mark :]
    assert shown == hello[0] and len(hello) > 1 and hello_steps > hello_before[0]
    release(hello_steps - hello_before[0])
    assert term.wait_for(">>> ").startswith(hello_text + "\n")

    term.type("/help\n")
    listed = term.wait_for(">>> ")
    assert all(c in listed for c in ("/help", "/clear", "/exit", "Ctrl-C"))

    term.type("/clear\n")
    assert "(conversation cleared)\n" in term.wait_for(">>> ")

    # Ctrl-C while a reply waits at the gate stops that reply; the chat goes on
    term.type("the\n")
    term.wait_for("the\n")
    term.mark = len(term.screen)
    release(the_before[0])
    term.wait_for(the[0])
    term.type("\x03")
    stopped = term.wait_for(">>> ")
    assert "(stopped)\n" in stopped and "Traceback" not in stopped
    assert len(the) > 1 and "".join(the[1:]) not in stopped  # the rest of that reply never came

    term.type("hello\n")
    release(hello_steps)
    assert hello_text + "\n" in term.wait_for(">>> ")

    term.type("/exit\n")
    assert term.exit_status() == 0
    assert "Traceback" not in term.screen


@pytest.mark.e2e
@pytest.mark.parametrize("key", ["\x03", "\x04"], ids=["ctrl-c", "ctrl-d"])
def test_interactive_on_a_terminal_exits_cleanly_at_the_prompt(engine, key):
    term = Terminal(["-m", "dsv3", *ARGS])
    try:
        want = engine.generate(["hello"], MAX_NEW, temperature=0.0, chat=False)[0].text
        assert "/help" in term.wait_for(">>> ")  # the greeting says how to get the commands
        term.type("hello\n")
        assert term.wait_for(">>> ").startswith("hello\n" + want + "\n")
        term.type("/clear\n")
        assert "(conversation cleared)" in term.wait_for(">>> ")
        term.type(key)
        assert term.exit_status() == 0
        assert "Traceback" not in term.screen and "interrupted" not in term.screen
    finally:
        term.close()
