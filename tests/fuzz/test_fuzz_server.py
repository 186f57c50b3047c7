"""Fuzz dsv3 serve: JSON bodies of /v1/completions and /v1/chat/completions with fields of odd types,
ranges, nesting, unicode and sizes, raw bodies that are not JSON, and odd methods, paths and headers,
all sent to one ``dsv3 serve`` subprocess (its own HOME and TMPDIR, an address-space limit).

Each answer must be a 200 with a well-formed completion (or a complete event stream), or a 4xx in
OpenAI's error shape with a one-line message; a /health round trip after each request makes the server
write the request's log lines, which must hold no traceback. At the end every slot must be free, and
the server's whole log (until it stopped) is checked again.
"""

from __future__ import annotations

import json
import os
import queue
import random
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fuzz.cases import WEIRD, AreaTimer, copy_base, new_case
from tests.fuzz.harness import (
    FILE_SIZE_LIMIT,
    STATS,
    TIMEOUT_S,
    TRACEBACK_MARKS,
    assert_clean,
    cases_for,
    diff,
    memory_limit,
    snapshot,
)

pytestmark = pytest.mark.e2e

httpx = pytest.importorskip("httpx", reason="the server fuzz sends its requests with httpx")
pytest.importorskip("fastapi", reason="dsv3 serve needs the 'serve' extra (fastapi, uvicorn)")

AREA = "server"
KEY = "sk-fuzz"
NAME = "tiny"
MAX_BODY = 65536
SERVE = ["--dtype", "float32", "--port", "0", "--max-model-len", "64", "--max-tokens-limit", "16"]
SERVE += ["--max-batch", "4", "--max-request-bytes", str(MAX_BODY), "--api-key", KEY, "--served-model-name", NAME]
SERVE += ["--log-level", "warning"]
COMPLETION = {"model": NAME, "prompt": "the cat sat", "max_tokens": 4, "temperature": 0}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4}


def _nested(depth: int, leaf: object = "x") -> object:
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


TEXTS = ["", " ", "the cat", "\ud800", "a\udc80b", "\x00", "é😀\u202e\u0301", "<s></s>", "the " * 200, "x" * 20_000]
FIELDS = {  # field -> values beyond WEIRD
    "model": [NAME, NAME.upper(), NAME + " ", "../tiny", "\ud800"],
    "prompt": TEXTS
    + [["the", "cat"], [3, 4, 5], [[3, 4], [5]], [96], [-1], [2**63], [[]], [""], ["a"] * 40, _nested(60), _nested(70)],
    "messages": [
        [],
        [{}],
        [{"role": "user"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]}],
        [{"role": "wizard", "content": "hi"}],
        [{"role": "developer", "content": "hi"}, {"role": "user", "content": "x"}],
        [{"role": "user", "content": "hi", "extra": _nested(10)}],
        [{"role": "user", "content": t} for t in TEXTS[:4]],
        [{"role": "user", "content": "hi"}] * 300,
        [{"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": _nested(70)}],
        "hello",
    ],
    "max_tokens": [1, 16, 17, 0, -1, 2**63, 1.0, "4", True],
    "max_completion_tokens": [1, 16, 17, 0, "4"],
    "temperature": [0, 0.0, 1, 2, 2.0001, -0.1, 1e-300, "0", True],
    "top_p": [1, 1e-300, 0, -0.0, 0.5, 1.0000001, "1"],
    "n": [1, 2, 0, 10**6],
    "stream": [True, False, "true", 1],
    "stream_options": [{"include_usage": True}, {"include_usage": "yes"}, []],
    "stop": ["", "x", "the", ["a", "b"], [""] * 20, ["s"] * 17, [1], {"a": 1}, "\ud800", ["\ud800"]],
    "seed": [0, -1, 2**63, 2**64, -(2**63) - 1, 1.5, "1"],
    "presence_penalty": [0, 2, 3, -2.5],
    "frequency_penalty": [0, 1.5, -3],
    "logit_bias": [{"5": 100}, {"x": "y"}, {str(i): 1 for i in range(500)}, {"5": -100, "6": 1e300}, {"-1": 1}, []],
    "repetition_penalty": [1, 0, -1, 1e-300, 1e308, "1"],
    "top_k": [-1, 0, 1, 10**9, -2, 1.5],
    "min_p": [0, 0.5, 1, -0.1, 2],
    "min_tokens": [0, 3, 16, 17, -1, 2**63],
    "stop_token_ids": [[1], [], [10**9], ["a"], [-1], 5],
    "user": ["u", "\ud800", 5],
    "ignore_eos": [True, False, "yes"],
    "return_token_ids": [True, "no"],
    "echo": [True, False, 1],
    "suffix": ["x", 5],
    "best_of": [1, 2, 0],
    "logprobs": [0, 1, 5, True, -1],
    "top_logprobs": [0, 3, -1],
    "tools": [[], [{"type": "function", "function": {"name": "f"}}], {}],
    "response_format": [{"type": "json_object"}, {"type": "text"}, []],
    "unknown_field": [_nested(40), "x" * 30_000],
}
COMPLETION_FIELDS = [
    f for f in FIELDS if f not in ("messages", "max_completion_tokens", "top_logprobs", "tools", "response_format")
]
CHAT_FIELDS = [f for f in FIELDS if f not in ("prompt", "echo", "suffix", "best_of")]
RAW = [
    b"",
    b"{",
    b"[]",
    b"null",
    b"123",
    b'"a string"',
    b"\xff\xfe{}",
    b'{"model": "tiny", "prompt": "caf\xe9"}',
    b'{"model": "tiny", "prompt": NaN}',
    b'{"model": "tiny", "prompt": "x", "temperature": Infinity}',
    b'{"model": "tiny", "prompt": "x", "top_p": -Infinity}',
    b'{"model": "tiny", "prompt": "x", "max_tokens": 1e999}',
    b'{"model": "tiny", "prompt": "x", "prompt": 5}',
    b'{"model": "tiny", "prompt": "x"} trailing',
    b"\xef\xbb\xbf" + json.dumps(COMPLETION).encode(),
    b"[" * 100_000 + b"]" * 100_000,
    b'{"a":' * 5000 + b"1" + b"}" * 5000,
    json.dumps({**COMPLETION, "prompt": "x" * (MAX_BODY + 10)}).encode(),
    b'{"model": "tiny", "prompt": "\\ud800\\udc00 ok \\udbff"}',
]


@dataclass
class Request:
    name: str
    method: str
    path: str
    body: bytes | None
    headers: dict[str, str | bytes]
    stream: bool = False

    def reproducer(self, url: str) -> str:
        head = " ".join(f"-H '{k}: {v}'" for k, v in self.headers.items())
        data = "" if self.body is None else f" --data-binary {self.body[:300]!r}{'...' if len(self.body) > 300 else ''}"
        return f"curl -X {self.method} {url}{self.path} {head}{data}"


def _headers(content_type: str | None = "application/json", key: str | None = KEY) -> dict[str, str | bytes]:
    h: dict[str, str | bytes] = {}
    if content_type:
        h["Content-Type"] = content_type
    if key is not None:
        h["Authorization"] = f"Bearer {key}"
    return h


def _body(
    base: dict, fields: list[str], rng: random.Random, count: int, first: str | None = None
) -> tuple[bytes, str, bool]:
    body = json.loads(json.dumps(base))
    done = []
    for i in range(count):
        field = first if i == 0 and first else rng.choice(fields)
        if rng.random() < 0.1 and field in body:
            del body[field]
            done.append(f"del {field}")
            continue
        body[field] = rng.choice(FIELDS[field] + WEIRD) if rng.random() < 0.7 else rng.choice(FIELDS[field])
        done.append(f"{field}={body[field]!r:.50}")
    return json.dumps(body).encode(), ", ".join(done), body.get("stream") is True


def _request(i: int, rng: random.Random) -> Request:
    kind = i % 10
    if kind in (0, 1, 2, 3):  # one completion field, round the fields
        body, done, stream = _body(
            COMPLETION, COMPLETION_FIELDS, rng, 1, COMPLETION_FIELDS[(i // 10 * 4 + kind) % len(COMPLETION_FIELDS)]
        )
        return Request(f"completions {done}", "POST", "/v1/completions", body, _headers(), stream)
    if kind in (4, 5, 6):
        body, done, stream = _body(CHAT, CHAT_FIELDS, rng, 1, CHAT_FIELDS[(i // 10 * 3 + kind - 4) % len(CHAT_FIELDS)])
        return Request(f"chat {done}", "POST", "/v1/chat/completions", body, _headers(), stream)
    if kind == 7:  # several fields at once
        chat = rng.random() < 0.5
        base, fields = (CHAT, CHAT_FIELDS) if chat else (COMPLETION, COMPLETION_FIELDS)
        body, done, stream = _body(base, fields, rng, rng.randint(2, 4))
        path = "/v1/chat/completions" if chat else "/v1/completions"
        return Request(f"{path} {done}", "POST", path, body, _headers(), stream)
    if kind == 8:
        raw = RAW[(i // 10) % len(RAW)]
        path = rng.choice(["/v1/completions", "/v1/chat/completions"])
        return Request(f"raw {raw[:40]!r} to {path}", "POST", path, raw, _headers())
    # methods, paths, headers
    body = json.dumps(COMPLETION).encode()
    variant = (i // 10) % 9
    if variant == 0:
        return Request("no API key", "POST", "/v1/completions", body, _headers(key=None))
    if variant == 1:
        headers = {**_headers(), "Authorization": "Bearer sk-\u00e9".encode("latin-1")}  # not ASCII
        return Request("wrong API key", "POST", "/v1/completions", body, headers)
    if variant == 2:
        return Request("text/plain body", "POST", "/v1/completions", body, _headers(content_type="text/plain"))
    if variant == 3:
        return Request("no content type", "POST", "/v1/completions", body, _headers(content_type=None))
    if variant == 4:
        return Request("GET a POST route", "GET", "/v1/completions", None, _headers())
    if variant == 5:
        return Request(
            "unknown path",
            "POST",
            rng.choice(["/v1/embeddings", "/v2/x", "/v1/models/../../etc/passwd", "/%ff"]),
            body,
            _headers(),
        )
    if variant == 6:
        return Request(
            "model card of an odd name",
            "GET",
            rng.choice(["/v1/models/tiny", "/v1/models/%ud800", "/v1/models/" + "x" * 5000]),
            None,
            _headers(),
        )
    if variant == 7:
        return Request("PUT", "PUT", "/v1/chat/completions", body, _headers())
    return Request("models list", "GET", "/v1/models", None, _headers())


# ------------------------------------------------------------------------------------------ the server
def _preexec(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))


class Server:
    """One ``dsv3 serve`` subprocess: its URL, and its stderr lines as they come (a reader thread)."""

    def __init__(self, ckpt: Path, dirs):
        limit = memory_limit()
        cmd = [sys.executable, "-m", "dsv3", "serve", "--ckpt-path", str(ckpt), *SERVE]
        self.proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=dirs.env(),
            cwd=dirs.work,
            start_new_session=True,
            preexec_fn=lambda: _preexec(limit),
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            self.url = self._wait_for_url()
        except BaseException:  # never leave the server (its own session) running
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise

    def _read(self) -> None:
        for raw in self.proc.stderr:
            self.lines.put(raw.decode("utf-8", "backslashreplace"))

    def _wait_for_url(self) -> str:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            self.log.append(line)
            m = re.search(r"on (http://\S+?)/v1 ", line)
            if m:
                return m.group(1)
        raise AssertionError("dsv3 serve did not start:\n" + "".join(self.log))

    def drain(self, settle: float = 0.05) -> list[str]:
        """The log lines written since the last call."""
        time.sleep(settle)
        got = []
        while True:
            try:
                got.append(self.lines.get_nowait())
            except queue.Empty:
                break
        self.log += got
        return got

    def stop(self) -> int | None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            return None
        self.reader.join(TIMEOUT_S)
        self.drain(0)
        return self.proc.returncode


def _judge(client, req: Request, url: str) -> tuple[str, str]:
    """(kind, detail) of one request's answer."""
    try:
        if req.stream:
            with client.stream(req.method, url + req.path, content=req.body, headers=req.headers) as r:
                text = "".join(r.iter_text())
                status, ctype = r.status_code, r.headers.get("content-type", "")
        else:
            r = client.request(req.method, url + req.path, content=req.body, headers=req.headers)
            status, ctype, text = r.status_code, r.headers.get("content-type", ""), r.text
    except httpx.TimeoutException:
        return "hang", f"no answer within {TIMEOUT_S:g} s"
    except httpx.HTTPError as exc:
        return "crash", f"{type(exc).__name__}: {exc}"
    if status >= 500:
        return "unclear", f"{status}: {text[:300]}"
    if status == 200:
        if "text/event-stream" in ctype:
            events = [e for e in text.split("\n\n") if e.strip()]
            ok = events and events[-1].strip() == "data: [DONE]" and all(e.startswith("data: ") for e in events)
            return ("run", f"{len(events)} events") if ok else ("unclear", f"stream {text[-300:]!r}")
        try:
            body = json.loads(text)
        except ValueError:
            return "unclear", f"200 not JSON: {text[:200]!r}"
        if req.path.startswith("/v1/models"):
            return ("run", "model card") if isinstance(body, dict) else ("unclear", text[:200])
        good = isinstance(body, dict) and isinstance(body.get("choices"), list) and body["choices"]
        return ("run", f"{len(body['choices'])} choice(s)") if good else ("unclear", f"200: {text[:300]}")
    try:
        err = json.loads(text)["error"]
    except (ValueError, KeyError, TypeError):
        return "unclear", f"{status} not in OpenAI's error shape: {text[:300]!r}"
    shaped = isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
    if not shaped or not isinstance(err["message"], str) or not err["message"] or "\n" in err["message"]:
        return "unclear", f"{status} error not one line in OpenAI's shape: {text[:300]!r}"
    return "error", f"{status} {err['message'][:200]}"


def _record(name: str, kinds: list[str], reproducer: str, detail: str) -> None:
    STATS.record(AREA, kinds, name, reproducer, detail)


def test_fuzz_server(bases, case_root):
    with AreaTimer(AREA):
        dirs = new_case(case_root, AREA, 0)
        ckpt = copy_base(bases["chat"], dirs)
        before = snapshot(dirs.sandbox)
        server = Server(ckpt, dirs)
        url = server.url
        try:
            with httpx.Client(timeout=TIMEOUT_S) as client:
                for i in range(cases_for(AREA)):
                    req = _request(i, random.Random(f"{AREA}:{i}"))
                    kind, detail = _judge(client, req, url)
                    kinds = [kind]
                    try:  # the request's log lines are written before this answer
                        client.get(url + "/health", timeout=TIMEOUT_S)
                    except httpx.HTTPError:
                        pass
                    logged = server.drain()
                    if any(mark in line for line in logged for mark in TRACEBACK_MARKS):
                        kinds.append("traceback")
                        detail += " | log: " + "".join(logged)[-1500:]
                    _record(f"[{i}] {req.name}", kinds, req.reproducer(url), detail)
                    if kind == "crash" and server.proc.poll() is not None:
                        break  # the server is gone: every later case would say the same
                health = client.get(url + "/health", timeout=TIMEOUT_S).json()
            free = health.get("slots_used") == 0 and health.get("status") == "ok"
            _record(
                "health after every request", ["run" if free else "unclear"], f"GET {url}/health", json.dumps(health)
            )
        finally:
            code = server.stop()
        tracebacks = [line for line in server.log if any(mark in line for mark in TRACEBACK_MARKS)]
        stopped = code is not None and not tracebacks
        detail = f"exit {code}; {len(tracebacks)} traceback line(s) in the log: {''.join(server.log)[-1500:]}"
        _record("whole log and stop", ["run" if stopped else "traceback" if tracebacks else "hang"], "SIGTERM", detail)
        changed = diff(before, snapshot(dirs.sandbox))
        kinds = ["run"] + (["touched_outside"] if changed else [])
        _record("checkpoint directory after serving", kinds, str(dirs.sandbox), f"changed: {changed}")
        if not STATS.failures_of(AREA):
            dirs.remove()
    assert_clean(AREA)
