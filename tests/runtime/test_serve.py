"""``dsv3 serve`` end to end: the real ``openai`` client against a uvicorn server started here.

Greedy responses equal ``dsv3 run`` / Engine.generate for the same prompts; malformed, oversized
and abandoned requests leave the server healthy with every slot free.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="dsv3 serve needs the 'serve' extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")
openai = pytest.importorskip("openai", reason="the serving tests use the openai client")
uvicorn = pytest.importorskip("uvicorn", reason="dsv3 serve needs the 'serve' extra (fastapi, uvicorn)")

import dsv3  # noqa: E402
from dsv3.commands.serve import cache_bytes  # noqa: E402
from dsv3.runtime.serve import bind_socket  # noqa: E402
from dsv3.runtime.serve.app import ServeSettings, create_app  # noqa: E402
from dsv3.runtime.serve.scheduler import Scheduler  # noqa: E402
from tests.helpers import add_tiny_tokenizer, make_checkpoint  # noqa: E402

KEY = "sk-test-key"
NAME = "tiny"
WAIT_S = 60  # bound on every wait; the tiny model answers in well under a second
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}and{% endif %}"
)
PROMPTS = ["the cat sat on the mat", "hello world", "a big dog ran", "small", "the mat is big and the cat is small"]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A tiny checkpoint (with an MTP layer) and a word-level tokenizer that has a chat template."""
    from transformers import AutoTokenizer

    path = make_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", seed=4, mtp=True)
    add_tiny_tokenizer(path)
    tok = AutoTokenizer.from_pretrained(str(path))
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def engine(ckpt):
    return dsv3.load(ckpt, dtype="float32")


SETTINGS = ServeSettings(
    model_name=NAME,
    max_model_len=64,
    max_prompt_tokens=30,
    max_tokens_limit=40,
    max_request_bytes=4096,
    api_key=KEY,
    disconnect_poll_s=0.05,
)


@contextlib.contextmanager
def serving(engine, settings: ServeSettings = SETTINGS, max_batch: int = 4, mtp: int = 0):
    """A uvicorn server on a free loopback port in a background thread: yields (base url, scheduler)."""
    scheduler = Scheduler(engine.model, max_batch, settings.max_model_len, max_waiting=16, mtp=mtp)
    app = create_app(engine, scheduler, settings)
    sock = bind_socket("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", scheduler
    finally:
        server.should_exit = True
        thread.join(WAIT_S)
        sock.close()


@pytest.fixture(scope="module")
def server(engine):
    with serving(engine) as (url, scheduler):
        yield url, scheduler


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=WAIT_S)


def health(url: str) -> dict:
    return httpx.get(url + "/health", timeout=WAIT_S).json()


def wait_for(url: str, check, what: str) -> dict:
    deadline = time.monotonic() + WAIT_S
    while True:
        h = health(url)
        if check(h):
            return h
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {h}"
        time.sleep(0.02)


def hold_decode(scheduler: Scheduler) -> threading.Event:
    """Make decode steps wait until the returned event is set (the test restores the scheduler after)."""
    gate = threading.Event()
    decode = scheduler._decode

    def held(rows):
        gate.wait(WAIT_S)
        decode(rows)

    scheduler._decode = held
    return gate


@contextlib.contextmanager
def held(scheduler: Scheduler):
    gate = hold_decode(scheduler)
    try:
        yield gate
    finally:
        gate.set()
        del scheduler._decode  # back to the class's method


def _ref(engine, prompt: str, n: int, chat: bool, **kw):
    return engine.generate([prompt], n, chat=chat, **kw)[0]


# ------------------------------------------------------------ identity, auth
def test_models_lists_the_served_model_and_needs_the_key(server, client):
    assert [m.id for m in client.models.list().data] == [NAME]
    bad = openai.OpenAI(base_url=server[0] + "/v1", api_key="wrong", max_retries=0, timeout=WAIT_S)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model=NAME, prompt="hello", max_tokens=2)
    r = httpx.get(server[0] + "/v1/models", timeout=WAIT_S)  # no Authorization header at all
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# ------------------------------------------------------------ equality with dsv3 run
def test_greedy_completions_equal_run_under_concurrency(engine, server, client):
    """Six concurrent requests on four slots, different lengths: each equals Engine.generate alone."""
    budgets = [5, 12, 3, 20, 9, 7]
    prompts = PROMPTS + PROMPTS[:1]
    want = [_ref(engine, p, n, chat=False, temperature=0) for p, n in zip(prompts, budgets, strict=True)]

    def ask(args):
        p, n = args
        return client.completions.create(
            model=NAME, prompt=p, max_tokens=n, temperature=0, extra_body={"return_token_ids": True}
        )

    with ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, zip(prompts, budgets, strict=True)))
    for r, ref, p in zip(got, want, prompts, strict=True):
        choice = r.choices[0]
        assert choice.text == ref.text
        assert choice.model_extra["token_ids"] == ref.token_ids
        assert choice.finish_reason == ref.finish_reason
        assert r.usage.prompt_tokens == len(engine.encode(p, chat=False))
        assert r.usage.completion_tokens == len(ref.token_ids)
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert wait_for(server[0], lambda h: h["slots_used"] == 0, "free slots")["waiting"] == 0


def test_greedy_chat_equals_run(engine, client):
    for prompt, n in [("hello world", 10), ("the cat is big", 6)]:
        ref = _ref(engine, prompt, n, chat=True, temperature=0)
        r = client.chat.completions.create(
            model=NAME, messages=[{"role": "user", "content": prompt}], max_tokens=n, temperature=0
        )
        assert r.choices[0].message.role == "assistant"
        assert r.choices[0].message.content == ref.text
        assert r.choices[0].finish_reason == ref.finish_reason
        assert r.usage.completion_tokens == len(ref.token_ids)
        assert r.usage.prompt_tokens == len(engine.encode(prompt, chat=True))


def test_cli_run_jsonl_equals_server(ckpt, client):
    """The literal `dsv3 run --temperature 0 --output-format jsonl` output, prompt by prompt."""
    cmd = [sys.executable, "-m", "dsv3", "run", "--ckpt-path", str(ckpt), "--dtype", "float32"]
    cmd += ["--temperature", "0", "--max-new-tokens", "8", "--raw", "--output-format", "jsonl"]
    for p in PROMPTS[:2]:
        cmd += ["--prompt", p]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=True).stdout
    records = [json.loads(line) for line in out.splitlines()]
    assert len(records) == 2
    for rec in records:
        r = client.completions.create(
            model=NAME, prompt=rec["prompt"], max_tokens=8, temperature=0, extra_body={"return_token_ids": True}
        )
        assert r.choices[0].text == rec["completion"]
        assert r.choices[0].model_extra["token_ids"] == rec["token_ids"]
        assert r.choices[0].finish_reason == rec["finish_reason"]


def test_streaming_equals_non_streaming(engine, client):
    ref = _ref(engine, PROMPTS[0], 15, chat=False, temperature=0)
    stream = client.completions.create(
        model=NAME, prompt=PROMPTS[0], max_tokens=15, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text == ref.text and finishes == [ref.finish_reason]
    assert chunks[-1].usage.completion_tokens == len(ref.token_ids) and not chunks[-1].choices

    ref = _ref(engine, "hello world", 12, chat=True, temperature=0)
    stream = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "hello world"}], max_tokens=12, temperature=0, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason


def test_prompt_lists_give_one_choice_each(engine, client):
    r = client.completions.create(model=NAME, prompt=PROMPTS[:3], max_tokens=4, temperature=0)
    assert [c.index for c in r.choices] == [0, 1, 2]
    for c, p in zip(r.choices, PROMPTS[:3], strict=True):
        assert c.text == _ref(engine, p, 4, chat=False, temperature=0).text
    ids = engine.encode(PROMPTS[1], chat=False)
    r = client.completions.create(model=NAME, prompt=ids, max_tokens=4, temperature=0)  # token ids
    assert r.choices[0].text == _ref(engine, PROMPTS[1], 4, chat=False, temperature=0).text


# ------------------------------------------------------------ sampling controls
def test_stop_string_cuts_the_text_and_stops(engine, client):
    ref = _ref(engine, PROMPTS[2], 30, chat=False, temperature=0)
    words = ref.text.split()
    assert len(words) >= 6, ref.text
    stop = words[3]
    want = ref.text[: ref.text.index(stop)]
    r = client.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=[stop, "zzz"])
    assert r.choices[0].text == want and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < len(ref.token_ids)  # generation really stopped early
    stream = client.completions.create(
        model=NAME, prompt=PROMPTS[2], max_tokens=30, temperature=0, stop=stop, stream=True
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_seed_makes_sampling_reproducible(engine, client):
    kw = dict(model=NAME, prompt=PROMPTS[3], max_tokens=12, temperature=1.0, top_p=0.9)
    a = client.completions.create(seed=42, extra_body={"return_token_ids": True}, **kw)
    b = client.completions.create(seed=42, extra_body={"return_token_ids": True}, **kw)
    ref = _ref(engine, PROMPTS[3], 12, chat=False, temperature=1.0, top_p=0.9, seed=42)
    assert a.choices[0].model_extra["token_ids"] == b.choices[0].model_extra["token_ids"] == ref.token_ids
    others = {
        tuple(
            client.completions.create(seed=s, extra_body={"return_token_ids": True}, **kw)
            .choices[0]
            .model_extra["token_ids"]
        )
        for s in range(5)
    }
    assert len(others) > 1  # different seeds do sample differently


def test_ignore_eos_generates_to_max_tokens(client):
    r = client.completions.create(
        model=NAME, prompt="hello", max_tokens=30, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.usage.completion_tokens == 30 and r.choices[0].finish_reason == "length"


# ------------------------------------------------------------ bad requests leave the server healthy
def _post(url: str, path: str, body, key: str | None = KEY, raw: bytes | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"} if key else {}
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(url + path, content=content, headers=headers, timeout=WAIT_S)


BAD = [
    ("/v1/completions", None, b"{not json", 400, None),
    ("/v1/completions", None, b"[1, 2]", 400, None),
    ("/v1/completions", None, b"\xff\xfe", 400, None),
    ("/v1/completions", {"model": NAME}, None, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi"}, None, 400, "model"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": -3}, None, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": "ten"}, None, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 2.5}, None, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 41}, None, 400, "max_tokens"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": "hot"}, None, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "temperature": -1}, None, 400, "temperature"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "top_p": 0}, None, 400, "top_p"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stream": "yes"}, None, 400, "stream"),
    ("/v1/completions", {"model": NAME, "prompt": 5}, None, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [1, "a"]}, None, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [[]]}, None, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": [5, 10_000]}, None, 400, "prompt"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stop": [""]}, None, 400, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "stop": 3}, None, 400, "stop"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "n": 2, "best_of": 1}, None, 400, "best_of"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 21}, None, 400, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "seed": "x"}, None, 400, "seed"),
    ("/v1/completions", {"model": NAME, "prompt": "cat " * 30}, None, 400, "prompt"),  # 31 tokens > 30
    ("/v1/completions", {"model": NAME, "prompt": "cat " * 28, "max_tokens": 40}, None, 400, "max_tokens"),  # 69 > 64
    ("/v1/completions", {"model": "gpt-4", "prompt": "hi"}, None, 404, "model"),
    ("/v1/chat/completions", {"model": NAME}, None, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": []}, None, 400, "messages"),
    ("/v1/chat/completions", {"model": NAME, "messages": ["hi"]}, None, 400, "messages.0"),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "wizard", "content": "hi"}]},
        None,
        400,
        "messages.0.role",
    ),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": 7}]},
        None,
        400,
        "messages.0.content",
    ),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        None,
        400,
        "messages.0.content.0",
    ),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0},
        None,
        400,
        "max_completion_tokens",
    ),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]},
        None,
        400,
        "tools.0",
    ),
    (  # a well-formed tool, but this tokenizer's chat template has no tool format
        "/v1/chat/completions",
        {
            "model": NAME,
            "messages": [{"role": "user", "content": "hi"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        None,
        400,
        "tools",
    ),
]


@pytest.mark.parametrize(("path", "body", "raw", "status", "param"), BAD)
def test_malformed_request_is_a_clear_4xx(server, path, body, raw, status, param):
    r = _post(server[0], path, body, raw=raw)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_oversized_body_is_413_and_server_stays_healthy(server, client):
    url = server[0]
    r = _post(url, "/v1/completions", {"model": NAME, "prompt": "cat " * 2000})
    assert r.status_code == 413 and "limit of 4096 bytes" in r.json()["error"]["message"]
    chunked = httpx.post(  # no Content-Length: the limit is enforced while reading
        url + "/v1/completions",
        content=iter([b'{"model": "tiny", "prompt": "', b"cat " * 1500, b'"}']),
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=WAIT_S,
    )
    assert chunked.status_code == 413
    h = health(url)
    assert h["status"] == "ok" and h["slots_used"] == 0 and h["waiting"] == 0
    assert client.completions.create(model=NAME, prompt="hello", max_tokens=3, temperature=0).choices[0].text


def test_after_bad_requests_every_slot_is_free_and_requests_succeed(server, client):
    for path, body, raw, status, _ in BAD:
        assert _post(server[0], path, body, raw=raw).status_code == status
    h = health(server[0])
    assert h["status"] == "ok" and h["slots_used"] == 0 and h["errors"] == 0
    r = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "hello"}], max_tokens=3)
    assert r.usage.completion_tokens >= 1


# ------------------------------------------------------------ abandoned requests free their slots
def idle(url: str) -> dict:
    return wait_for(url, lambda h: h["slots_used"] == 0 and h["waiting"] == 0, "an idle server")


def test_aborted_stream_frees_its_slot(server, client):
    url, scheduler = server
    before = idle(url)
    with held(scheduler) as gate:
        stream = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=40,
            stream=True,
            extra_body={"ignore_eos": True, "return_token_ids": True},
        )
        chunks = iter(stream)
        assert next(chunks).choices[0].delta.role == "assistant"
        assert len(next(chunks).choices[0].model_extra["token_ids"]) == 1  # the first token (from the prefill)
        stream.close()  # the client goes away; the decode step is still held
        wait_for(url, lambda h: h["cancelled"] == before["cancelled"] + 1, "the server to notice the disconnect")
        gate.set()
        h = wait_for(url, lambda h: h["slots_used"] == 0, "the slot to be freed")
    assert h["finished"] == before["finished"]  # it was freed by cancelling, not by running to its end
    assert h["status"] == "ok"
    assert client.completions.create(model=NAME, prompt="hello", max_tokens=3).usage.completion_tokens >= 1


def test_client_that_gives_up_on_a_non_streaming_request_frees_its_slot(server, client):
    url, scheduler = server
    before = idle(url)
    with held(scheduler) as gate:
        impatient = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=1.0)
        with pytest.raises(openai.APITimeoutError):
            impatient.completions.create(model=NAME, prompt="hello", max_tokens=40, extra_body={"ignore_eos": True})
        wait_for(url, lambda h: h["cancelled"] == before["cancelled"] + 1, "the server to notice the disconnect")
        gate.set()
        h = wait_for(url, lambda h: h["slots_used"] == 0, "the slot to be freed")
    assert h["finished"] == before["finished"]


def test_requests_join_a_running_batch(engine, server, client):
    """While one request is mid-generation, three more join its decode steps; all four stay exact."""
    url, scheduler = server
    prompts, budgets = PROMPTS[:4], [12, 6, 9, 4]
    want = [_ref(engine, p, n, chat=False, temperature=0) for p, n in zip(prompts, budgets, strict=True)]
    idle(url)
    with held(scheduler) as gate, ThreadPoolExecutor(4) as pool:
        first = pool.submit(client.completions.create, model=NAME, prompt=prompts[0], max_tokens=12, temperature=0)
        wait_for(url, lambda h: h["slots_used"] == 1, "the first request to start")
        rest = [
            pool.submit(client.completions.create, model=NAME, prompt=p, max_tokens=n, temperature=0)
            for p, n in zip(prompts[1:], budgets[1:], strict=True)
        ]
        wait_for(url, lambda h: h["waiting"] == 3, "three requests to queue")
        steps = health(url)["steps"]
        gate.set()
        got = [f.result(WAIT_S) for f in [first, *rest]]
    for r, ref in zip(got, want, strict=True):
        assert r.choices[0].text == ref.text
    h = health(url)
    assert h["peak_batch"] == 4
    assert h["steps"] - steps == budgets[0] - 1  # the others rode along in the first request's steps


# ------------------------------------------------------------ the command line
def test_dsv3_serve_command_with_mtp(ckpt, engine):
    """`dsv3 serve --mtp 2` in a subprocess, on a page pool of 96 positions: greedy answers equal plain generation;
    the start-up line states the pool and its bytes; /health says mtp mode and counts pages."""
    extra = ("--max-model-len", "64", "--mtp", "2", "--max-total-tokens", "96", "--page-size", "8")
    proc, lines, _ = _launch_serve(ckpt, "--port", "0", *extra)
    try:
        url, line = _serving(lines, "with continuous batching with speculative decoding")
        per_token = cache_bytes(engine.model, 1, 1)
        assert f"cache of 96 positions (12 pages of 8, {per_token} bytes per position, " in line
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT_S)
        for p in PROMPTS[:2]:
            r = client.completions.create(model=NAME, prompt=p, max_tokens=10, temperature=0)
            assert r.choices[0].text == _ref(engine, p, 10, chat=False, temperature=0).text
        h = health(url)
        assert h["mtp"] == 2 and h["finished"] == 2 and h["slots_used"] == 0
        assert h["drafts"] > 0 and 0 <= h["accepted_drafts"] <= h["drafts"]
        assert h["pages_total"] == 12 and h["page_size"] == 8 and h["pages_used"] == 0 and h["prefix_caching"]
    finally:
        proc.terminate()
        proc.wait(30)


def test_dsv3_serve_refuses_bad_limits_and_a_busy_port(ckpt, capsys):
    from dsv3.cli import main as cli_main

    assert cli_main(["serve", "--ckpt-path", str(ckpt), "--max-batch", "0"]) == 2
    assert "--max-batch must be at least 1" in capsys.readouterr().err
    assert cli_main(["serve", "--ckpt-path", str(ckpt), "--prefill-chunk", "-1"]) == 2
    assert "--prefill-chunk must be >= 0" in capsys.readouterr().err
    assert cli_main(["serve", "--ckpt-path", str(ckpt), "--page-size", "0"]) == 2
    assert "--page-size must be at least 1" in capsys.readouterr().err
    small = ["--port", "0", "--max-model-len", "64", "--max-total-tokens", "50", "--page-size", "8"]  # 7 pages
    assert cli_main(["serve", "--ckpt-path", str(ckpt), *small]) == 2
    assert "--max-total-tokens 50 cannot hold one request of --max-model-len 64" in capsys.readouterr().err
    busy = bind_socket("127.0.0.1", 0)
    try:
        assert cli_main(["serve", "--ckpt-path", str(ckpt), "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen on 127.0.0.1" in capsys.readouterr().err
    finally:
        busy.close()
    assert cli_main(["serve", "--ckpt-path", str(ckpt), "--port", "0", "--max-model-len", "4096"]) == 2
    assert "exceeds the model's max_position_embeddings (128)" in capsys.readouterr().err


# ------------------------------------------------------------ tensor parallel (torchrun)
def _launch_serve(ckpt, *extra: str, ranks: int = 1) -> tuple[subprocess.Popen, queue.Queue, threading.Thread]:
    """``dsv3 serve ...`` in a subprocess (under ``torchrun --standalone --nproc-per-node ranks`` when ranks > 1,
    in its own session); stderr lines in a queue, filled by the returned thread until the output ends."""
    cmd = [sys.executable, "-m", "dsv3"]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
        cmd += ["--no-python", str(Path(sys.executable).with_name("dsv3"))]
    cmd += ["serve", "--ckpt-path", str(ckpt), "--dtype", "float32"]
    cmd += ["--api-key", KEY, "--served-model-name", NAME, "--log-level", "warning", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=env, start_new_session=ranks > 1)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in proc.stderr], daemon=True)
    reader.start()
    return proc, lines, reader


def _serving_url(lines: queue.Queue, mode: str) -> str:
    """The URL of the start-up line "... on URL/v1 <mode>...", once /health says ok."""
    return _serving(lines, mode)[0]


def _serving(lines: queue.Queue, mode: str) -> tuple[str, str]:
    """The URL and the whole start-up line "... on URL/v1 <mode>...", once /health says ok."""
    while True:
        line = lines.get(timeout=120)
        m = re.search(rf"on (http://\S+?)/v1 {mode}", line)
        if m:
            wait_for(m.group(1), lambda h: h["status"] == "ok", "the server")
            return m.group(1), line


def _children(pid: int) -> list[int]:
    """The child processes of ``pid`` (torchrun's workers live in sessions of their own)."""
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _stop_group(proc: subprocess.Popen) -> list[int]:
    """SIGTERM to torchrun (it forwards it to the workers and waits); SIGKILL whatever is left.
    Returns the workers still alive after the graceful stop (should be none)."""
    workers = _children(proc.pid)
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(90)
    except subprocess.TimeoutExpired:
        pass
    left = [w for w in workers if _alive(w)]
    for pid in [*left, proc.pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait(30)
    return left


@pytest.mark.e2e
@pytest.mark.parametrize("mtp", ["0", "2"])
def test_tensor_parallel_serving_under_torchrun(ckpt, engine, mtp):
    """2 ranks (gloo): rank 0 serves and schedules, rank 1 replays every model call (and page assignment) on its
    shard; concurrent greedy answers (plain, and chunked prefill with MTP drafts) equal one process's generate(),
    on a pool of 10 pages of 4 that cannot hold the four requests at once (preemption)."""
    pool = ["--max-model-len", "24", "--page-size", "4", "--max-total-tokens", "40"]
    proc, lines, _ = _launch_serve(ckpt, "--port", "0", "--mtp", mtp, "--prefill-chunk", "3", *pool, ranks=2)
    try:
        url = _serving_url(lines, "with .*tensor parallel over 2 processes")
        client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT_S)

        def ask(p):
            return client.completions.create(model=NAME, prompt=p, max_tokens=8, temperature=0).choices[0].text

        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, PROMPTS[:4]))
        assert got == [_ref(engine, p, 8, chat=False, temperature=0).text for p in PROMPTS[:4]]
        # n=2: plain mode forks the prompt's pages (rank 1 copies the partial page too)
        two = client.completions.create(model=NAME, prompt=PROMPTS[4], max_tokens=6, temperature=0, n=2)
        assert [c.text for c in two.choices] == [_ref(engine, PROMPTS[4], 6, chat=False, temperature=0).text] * 2
        h = health(url)
        assert h["finished"] == 6 and h["slots_used"] == 0 and h["mtp"] == int(mtp)
        assert h["forked"] == (0 if mtp != "0" else 1)
    finally:
        left = _stop_group(proc)
    assert left == []  # SIGTERM: rank 0 drains, releases rank 1, and both exit


@pytest.mark.e2e
def test_tensor_parallel_serving_busy_port_stops_every_rank(ckpt):
    busy = bind_socket("127.0.0.1", 0)
    try:
        proc, lines, reader = _launch_serve(ckpt, "--port", str(busy.getsockname()[1]), ranks=2)
        try:
            assert proc.wait(120) != 0  # rank 1 does not wait for a server that never came
            reader.join(WAIT_S)
        finally:
            _stop_group(proc)
    finally:
        busy.close()
    text = ""
    while not lines.empty():
        text += lines.get()
    assert "cannot listen on 127.0.0.1" in text
