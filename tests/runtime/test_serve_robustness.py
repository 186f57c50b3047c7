"""``dsv3 serve`` never answers bad input with a 500 or a traceback in its log (issue 17, part 5).

One real ``dsv3 serve`` subprocess (the launcher of test_serve.py) gets each bad request in turn;
the module fixture records each answer and the log lines it caused (stderr, read until a /health
round trip and a short settle), then stops the server and keeps the rest of its log. Before the
fix: deeply nested JSON raised RecursionError (500 and a traceback), lone surrogates reached the
tokenizer or the JSON encoder (500), top_p=1e-300 made torch.multinomial fail (500), a request
uvicorn could not parse got a text/plain 400, and a client leaving mid-body logged a traceback.
"""

from __future__ import annotations

import json
import queue
import socket
import time

import pytest

from tests.runtime.test_serve import KEY, NAME, WAIT_S, _launch_serve, _post, _serving_url, ckpt, health  # noqa: F401

DEEP = 100_000
SETTLE_S = 0.3  # for the log lines of a request to reach the reader thread after its /health round trip


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


CASES = {  # name -> (path, raw body)
    "nested-prompt": ("/v1/completions", f'{{"model": "{NAME}", "prompt": {_nested(DEEP)}}}'),
    "nested-message": (
        "/v1/chat/completions",
        f'{{"model": "{NAME}", "messages": [{{"role": "user", "content": {_nested(DEEP)}}}]}}',
    ),
    "nested-unknown-field": ("/v1/completions", f'{{"model": "{NAME}", "prompt": "hi", "x": {_nested(200)}}}'),
    "surrogate-prompt": ("/v1/completions", f'{{"model": "{NAME}", "prompt": "the \\ud800 cat"}}'),
    "surrogate-prompt-list": ("/v1/completions", f'{{"model": "{NAME}", "prompt": ["hi", "\\udfff"]}}'),
    "surrogate-message": (
        "/v1/chat/completions",
        f'{{"model": "{NAME}", "messages": [{{"role": "user", "content": "a \\udc80"}}]}}',
    ),
    "surrogate-model": ("/v1/completions", '{"model": "ti\\ud800ny", "prompt": "hi"}'),
    "top-p-keeps-no-token": (
        "/v1/completions",
        f'{{"model": "{NAME}", "prompt": "the cat sat", "max_tokens": 6, "temperature": 1, "top_p": 1e-300}}',
    ),
    "body-null": ("/v1/chat/completions", "null"),  # the fuzz suite's finding: a 500 before
    "body-number": ("/v1/completions", "123"),
    "greedy": ("/v1/completions", f'{{"model": "{NAME}", "prompt": "the cat sat", "max_tokens": 6, "temperature": 0}}'),
}
# name -> (status, param) of the OpenAI-shaped error
ERRORS = {
    "nested-prompt": (400, None),
    "nested-message": (400, None),
    "nested-unknown-field": (400, None),
    "surrogate-prompt": (400, "prompt"),
    "surrogate-prompt-list": (400, "prompt.1"),
    "surrogate-message": (400, "messages.0.content"),
    "surrogate-model": (404, "model"),
    "body-null": (400, None),
    "body-number": (400, None),
}


def _raw(url: str, data: bytes, leave: bool = False) -> bytes:
    """Send ``data`` on a fresh connection; the whole answer (until the server closes), or b"" when ``leave``."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=WAIT_S) as sock:
        sock.sendall(data)
        if leave:
            return b""
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _drain(lines: queue.Queue, until: str | None = None) -> list[str]:
    """The log lines so far; with ``until``, wait (bounded) for a line containing it first."""
    got: list[str] = []
    deadline = time.monotonic() + WAIT_S
    while until is not None and not any(until in x for x in got) and time.monotonic() < deadline:
        try:
            got.append(lines.get(timeout=0.1))
        except queue.Empty:
            pass
    time.sleep(SETTLE_S)
    while not lines.empty():
        got.append(lines.get())
    return got


@pytest.fixture(scope="module")
def served(ckpt):  # noqa: F811
    """{case: (answer, log lines)} for every case, then "log": the server's whole log after the start-up line."""
    proc, lines, reader = _launch_serve(ckpt, "--port", "0", "--max-model-len", "64")
    out: dict = {}
    try:
        url = _serving_url(lines, "with continuous batching")
        for name, (path, body) in CASES.items():
            r = _post(url, path, None, raw=body.encode())
            health(url)  # the log of the request is written before this answer
            out[name] = (r, _drain(lines))
        out["malformed-http"] = (_raw(url, b"NOT AN HTTP REQUEST\r\n\r\n"), _drain(lines))
        partial = (
            f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{{"model": "{NAME}", "pro'
        )
        _raw(url, partial.encode(), leave=True)
        out["disconnect-mid-body"] = (None, _drain(lines, until="disconnected"))
        out["health"] = health(url)
    finally:
        proc.terminate()
        proc.wait(WAIT_S)
        reader.join(WAIT_S)
    out["log"] = [line for case in out.values() if isinstance(case, tuple) for line in case[1]] + _drain(lines)
    return out


@pytest.mark.parametrize("name", list(ERRORS))
def test_bad_request_is_an_openai_error_not_a_500(served, name):
    r, log = served[name]
    status, param = ERRORS[name]
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"] and "\n" not in err["message"]
    assert not any("Traceback" in line for line in log), log


def test_nested_json_names_the_depth(served):
    assert "nests deeper than" in served["nested-prompt"][0].json()["error"]["message"]


def test_a_lone_surrogate_is_named_and_echoed_escaped(served):
    assert "lone surrogate '\\ud800'" in served["surrogate-prompt"][0].json()["error"]["message"]
    assert "'ti\\ud800ny' does not exist" in served["surrogate-model"][0].json()["error"]["message"]


def test_a_top_p_that_keeps_no_token_answers_the_most_likely_tokens(served):
    r, log = served["top-p-keeps-no-token"]
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == served["greedy"][0].json()["choices"][0]["text"]
    assert not any("Traceback" in line for line in log), log


def test_a_malformed_http_request_gets_a_json_400(served):
    answer, log = served["malformed-http"]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"content-type: application/json" in head.lower()
    err = json.loads(body)["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert len(log) == 1 and "Invalid HTTP request" in log[0], log  # uvicorn's own one-line warning


def test_a_client_leaving_mid_body_is_one_log_line(served):
    _, log = served["disconnect-mid-body"]
    assert len(log) == 1, log
    assert "disconnected while sending the body of POST /v1/completions" in log[0]


def test_no_traceback_in_the_log_and_the_server_is_healthy(served):
    assert not any("Traceback" in line for line in served["log"]), "".join(served["log"])
    h = served["health"]
    assert h["status"] == "ok" and h["slots_used"] == 0 and h["errors"] == 0
    assert h["finished"] == 2  # the top_p and greedy requests
