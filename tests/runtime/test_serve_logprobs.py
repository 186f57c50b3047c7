"""``logprobs`` and ``echo`` on /v1/completions, chat's ``logprobs`` / ``top_logprobs``, and the tokenizer endpoints (what lm-evaluation-harness's
``local-completions`` model uses for loglikelihood tasks), against a float32 server started here.

Every log-probability is checked against ``log_softmax`` of :meth:`Engine.logits` over the same tokens.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="dsv3 serve needs the 'serve' extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")
pytest.importorskip("openai", reason="the serving tests use the openai client")

import dsv3  # noqa: E402
from tests.runtime import test_serve  # noqa: E402
from tests.runtime.test_serve import KEY, NAME, PROMPTS, WAIT_S, _post, health  # noqa: E402

ckpt, engine, server, client = test_serve.ckpt, test_serve.engine, test_serve.server, test_serve.client  # its fixtures

# The server and the reference both run the float32 model; they differ only in how the work is split
# (cached prefill/decode in a batch vs one uncached forward), which moves fp32 logits by ~1e-6.
TOL = 1e-4


def _ref_logprobs(engine, ids: list[int]):
    """log_softmax of the full-sequence logits, (T, V): row t scores token t + 1."""
    return engine.logits([ids])[0].log_softmax(-1)


def _complete(url: str, **body) -> dict:
    r = _post(url, "/v1/completions", {"model": NAME, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_echo_with_max_tokens_0_scores_every_prompt_token(engine, server):
    out = _complete(server[0], prompt=PROMPTS, echo=True, logprobs=3, max_tokens=0, temperature=0)
    assert out["usage"]["completion_tokens"] == 0
    assert len(out["choices"]) == len(PROMPTS)
    for prompt, choice in zip(PROMPTS, out["choices"], strict=True):
        ids = engine.encode(prompt, chat=False)
        ref = _ref_logprobs(engine, ids)
        lp = choice["logprobs"]
        assert choice["text"] == prompt and choice["finish_reason"] == "length"
        assert lp["tokens"] == [engine.tokenizer.decode([t], skip_special_tokens=False) for t in ids]
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert lp["text_offset"][0] == 0
        for t in range(1, len(ids)):
            assert abs(lp["token_logprobs"][t] - ref[t - 1, ids[t]].item()) <= TOL, (prompt, t)
            top = lp["top_logprobs"][t]
            values = list(top.values())
            assert len(top) == 3 and values == sorted(values, reverse=True)
            best = ref[t - 1].topk(3)
            assert list(top) == [engine.tokenizer.decode([i], skip_special_tokens=False) for i in best.indices.tolist()]
            assert all(abs(a - b) <= TOL for a, b in zip(values, best.values.tolist(), strict=True))


def test_prompt_logprobs_are_the_same_with_chunked_prefill(engine):
    """A prompt prefilled 3 tokens per loop is scored chunk by chunk; the scores do not change."""
    prompt = PROMPTS[4]
    ids = engine.encode(prompt, chat=False)
    assert len(ids) > 6  # several chunks
    ref = _ref_logprobs(engine, ids)
    with test_serve.serving(engine) as (url, scheduler):
        scheduler.prefill_chunk = 3  # read at every loop
        lp = _complete(url, prompt=prompt, echo=True, logprobs=1, max_tokens=0)["choices"][0]["logprobs"]
        assert scheduler.counters["prefill_tokens"] == len(ids)
        h = test_serve.wait_for(url, lambda h: h["slots_used"] == 0, "the scored prompt's slot to be free")
        assert h["finished"] == 1 and h["tokens"] == 0  # scored, nothing generated
    assert len(lp["token_logprobs"]) == len(ids)
    for t in range(1, len(ids)):
        assert abs(lp["token_logprobs"][t] - ref[t - 1, ids[t]].item()) <= TOL, t


def test_a_one_token_prompt_has_nothing_to_score(engine, server):
    bos = engine.tokenizer.bos_token_id
    choice = _complete(server[0], prompt=[bos], echo=True, logprobs=2, max_tokens=0)["choices"][0]
    assert choice["logprobs"]["token_logprobs"] == [None] and choice["logprobs"]["top_logprobs"] == [None]
    assert choice["finish_reason"] == "length"


def test_token_id_prompt_echo_gives_the_decoded_prompt(engine, server):
    ids = engine.encode(PROMPTS[0], chat=False)
    out = _complete(server[0], prompt=ids, echo=True, logprobs=0, max_tokens=0)
    choice = out["choices"][0]
    assert choice["text"] == engine.decode(ids)
    assert choice["logprobs"]["top_logprobs"][1:] == [{}] * (len(ids) - 1)  # logprobs 0: no alternatives


@pytest.mark.parametrize("echo", [False, True])
def test_greedy_generated_logprobs_are_the_step_logits(engine, server, echo):
    prompt = PROMPTS[1]
    ids = engine.encode(prompt, chat=False)
    out = _complete(
        server[0],
        prompt=prompt,
        max_tokens=6,
        temperature=0,
        logprobs=2,
        echo=echo,
        ignore_eos=True,
        return_token_ids=True,
    )
    choice = out["choices"][0]
    gen = choice["token_ids"]
    lp = choice["logprobs"]
    skip = len(ids) if echo else 0
    assert len(lp["token_logprobs"]) == skip + len(gen) == skip + 6
    if echo:
        assert choice["text"].startswith(prompt)
    ref = _ref_logprobs(engine, ids + gen)
    for k, t in enumerate(gen):
        row = ref[len(ids) + k - 1]
        assert abs(lp["token_logprobs"][skip + k] - row[t].item()) <= TOL, k
        top = lp["top_logprobs"][skip + k]
        assert len(top) == 2 and list(top.values()) == sorted(top.values(), reverse=True)
        assert (
            lp["tokens"][skip + k] == engine.tokenizer.decode([t], skip_special_tokens=False) == next(iter(top))
        )  # greedy: the chosen is the best
    offsets = lp["text_offset"]
    assert offsets == sorted(offsets) and offsets[0] == 0


def _stream(url: str, body: dict, path: str = "/v1/completions") -> list[dict]:
    headers = {"Authorization": f"Bearer {KEY}"}
    chunks = []
    with httpx.stream("POST", url + path, json=body, headers=headers, timeout=WAIT_S) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    return chunks


@pytest.mark.parametrize("echo", [False, True])
def test_streamed_logprobs_join_to_the_non_streamed_ones(server, echo):
    body = {"model": NAME, "prompt": PROMPTS[2], "max_tokens": 5, "temperature": 0, "logprobs": 2, "echo": echo}
    whole = _complete(server[0], **body)["choices"][0]
    joined = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    text = ""
    for c in _stream(server[0], {**body, "stream": True}):
        choice = c["choices"][0]
        text += choice["text"]
        if choice["logprobs"] is not None:
            for key in joined:
                joined[key] += choice["logprobs"][key]
    assert text == whole["text"]
    ref = whole["logprobs"]
    assert joined["tokens"] == ref["tokens"] and joined["text_offset"] == ref["text_offset"]
    for a, b in zip(joined["token_logprobs"], ref["token_logprobs"], strict=True):
        assert (a is None and b is None) or abs(a - b) <= TOL
    assert [None if t is None else list(t) for t in joined["top_logprobs"]] == [
        None if t is None else list(t) for t in ref["top_logprobs"]
    ]


def test_tokenize_round_trips_through_detokenize(engine, server):
    url = server[0]
    for prompt in PROMPTS:
        r = _post(url, "/tokenize", {"model": NAME, "prompt": prompt})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["tokens"] == engine.encode(prompt, chat=False)
        assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 64
        back = _post(url, "/detokenize", {"tokens": body["tokens"]}).json()
        assert back == {"prompt": engine.decode(body["tokens"])}
        assert engine.encode(back["prompt"], chat=False) == body["tokens"]
    messages = [{"role": "user", "content": PROMPTS[0]}]
    body = _post(url, "/tokenize", {"messages": messages}).json()
    assert body["tokens"] == engine.encode_chat(messages)


def test_version_and_tokenizer_info(engine, server):
    url = server[0]
    assert httpx.get(url + "/version", timeout=WAIT_S).json() == {"version": dsv3.__version__}
    assert httpx.get(url + "/tokenizer_info", timeout=WAIT_S).status_code == 401  # the key is needed
    info = httpx.get(url + "/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}, timeout=WAIT_S).json()
    assert info["eos_token"] == engine.tokenizer.eos_token
    assert info["chat_template"] == engine.tokenizer.chat_template and info["model_max_length"] == 64


BAD = [
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": 21}, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": -1}, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "logprobs": True}, "logprobs"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "echo": "yes"}, "echo"),
    ("/v1/completions", {"model": NAME, "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/chat/completions", {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "echo": True}, "echo"),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "logprobs": 1},
        "logprobs",
    ),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "logprobs": False, "top_logprobs": 0},
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"model": NAME, "messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
        "top_logprobs",
    ),
    ("/tokenize", {"model": NAME}, "prompt"),
    ("/tokenize", {"prompt": "hi", "messages": [{"role": "user", "content": "hi"}]}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
    ("/tokenize", {"model": "gpt-4", "prompt": "hi"}, "model"),
    ("/detokenize", {"tokens": [1, 10_000]}, "tokens"),
    ("/detokenize", {"tokens": "1 2"}, "tokens"),
    ("/detokenize", {}, "tokens"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD)
def test_bad_logprobs_echo_and_tokenizer_requests_are_400_naming_the_field(server, path, body, param):
    r = _post(server[0], path, body)
    expected = 404 if param == "model" else 400
    assert r.status_code == expected, r.text
    assert r.json()["error"]["param"] == param


def test_loglikelihood_as_lm_eval_local_completions_asks_for_it(engine, server):
    """lm-eval's request for a (context, continuation) pair: the joined token ids, ``max_tokens`` 1,
    ``logprobs`` 1, ``echo``; it sums ``token_logprobs[ctxlen:-1]`` and calls the continuation greedy when
    each of those equals the best of its ``top_logprobs``."""
    url = server[0]
    context = engine.encode(PROMPTS[0], chat=False)
    for continuation in (" is big", " ran"):
        cont = _post(url, "/tokenize", {"prompt": continuation, "add_special_tokens": False}).json()["tokens"]
        assert cont
        ids = context + cont
        body = {"prompt": [ids], "temperature": 0, "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True}
        lp = _complete(url, **body)["choices"][0]["logprobs"]
        ctxlen = len(context)
        got = lp["token_logprobs"][ctxlen:-1]
        ref_all = _ref_logprobs(engine, ids)
        ref = [ref_all[t - 1, ids[t]].item() for t in range(ctxlen, len(ids))]
        assert len(got) == len(cont) and abs(sum(got) - sum(ref)) <= TOL * len(cont)
        greedy = all(v == max(top.values()) for v, top in zip(got, lp["top_logprobs"][ctxlen:-1], strict=True))
        ref_greedy = all(ref_all[t - 1].argmax().item() == ids[t] for t in range(ctxlen, len(ids)))
        assert greedy == ref_greedy


def test_tokenize_without_special_tokens_leaves_out_bos(engine, server):
    """lm-eval's remote tokenizer finds the EOS id as the first token of ``/tokenize`` of the EOS text."""
    url = server[0]
    with_bos = _post(url, "/tokenize", {"prompt": PROMPTS[1]}).json()["tokens"]
    plain = _post(url, "/tokenize", {"prompt": PROMPTS[1], "add_special_tokens": False}).json()["tokens"]
    assert engine.tokenizer.bos_token_id is not None and with_bos == [engine.tokenizer.bos_token_id] + plain
    eos = _post(url, "/tokenize", {"prompt": engine.tokenizer.eos_token, "add_special_tokens": False}).json()
    assert eos["tokens"][0] == engine.tokenizer.eos_token_id


def test_requests_with_different_logprobs_in_one_batch(engine, server):
    """Rows asking for different top-k (or none) decode in the same steps; each gets its own."""
    # max_tokens 4 each: the three queued behind the held first row share its remaining steps
    url, scheduler = server
    asks = [None, 0, 2, 5]
    prompts = PROMPTS[:4]
    with ThreadPoolExecutor(len(asks)) as pool, test_serve.held(scheduler) as gate:
        body = {"max_tokens": 4, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
        futures = [
            pool.submit(_complete, url, prompt=p, logprobs=k, **body) for p, k in zip(prompts, asks, strict=True)
        ]
        # the first one's decode is held, so the other three are queued and join its batch after it
        test_serve.wait_for(url, lambda h: h["slots_used"] + h["waiting"] == 4, "all four to be in")
        gate.set()
        outs = [f.result(WAIT_S)["choices"][0] for f in futures]
    for prompt, k, choice in zip(prompts, asks, outs, strict=True):
        if k is None:
            assert choice["logprobs"] is None
            continue
        ids, gen = engine.encode(prompt, chat=False), choice["token_ids"]
        ref = _ref_logprobs(engine, ids + gen)
        lp = choice["logprobs"]
        assert [len(t) for t in lp["top_logprobs"]] == [k] * len(gen)
        for j, t in enumerate(gen):
            assert abs(lp["token_logprobs"][j] - ref[len(ids) + j - 1, t].item()) <= TOL, (k, j)


def test_logprobs_and_max_tokens_0_are_refused_with_mtp(engine):
    """Speculative decoding samples inside the verifier, so the server refuses to score there."""
    with test_serve.serving(engine) as (url, scheduler):
        scheduler.mtp = 1  # only the app's check reads it: the refused requests never reach the scheduler
        try:
            for body, param in (({"logprobs": 1}, "logprobs"), ({"echo": True, "max_tokens": 0}, "max_tokens")):
                r = _post(url, "/v1/completions", {"model": NAME, "prompt": "hi", **body})
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
            messages = [{"role": "user", "content": "hi"}]
            r = _post(url, "/v1/chat/completions", {"model": NAME, "messages": messages, "logprobs": True})
            assert r.status_code == 400 and r.json()["error"]["param"] == "logprobs", r.text
        finally:
            scheduler.mtp = 0


def _chat(url: str, **body) -> dict:
    r = _post(url, "/v1/chat/completions", {"model": NAME, **body})
    assert r.status_code == 200, r.text
    return r.json()


def _shown(engine, t: int) -> str:
    return engine.tokenizer.decode([t], skip_special_tokens=False)


@pytest.mark.parametrize("k", [0, 3])
def test_greedy_chat_logprobs_are_the_step_logits(engine, server, k):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    ids = engine.encode_chat(messages)
    body = {"max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True, "logprobs": True}
    choice = _chat(server[0], messages=messages, top_logprobs=k, **body)["choices"][0]
    gen = choice["token_ids"]
    content = choice["logprobs"]["content"]
    assert len(gen) == len(content) == 6
    ref = _ref_logprobs(engine, ids + gen)
    for j, (t, entry) in enumerate(zip(gen, content, strict=True)):
        row = ref[len(ids) + j - 1]
        assert entry["token"] == _shown(engine, t) and entry["bytes"] == list(entry["token"].encode("utf-8"))
        assert abs(entry["logprob"] - row[t].item()) <= TOL, j
        top = entry["top_logprobs"]
        assert len(top) == k
        if k == 0:
            continue
        values = [e["logprob"] for e in top]
        assert values == sorted(values, reverse=True) and top[0]["token"] == entry["token"]  # greedy: the best
        best = row.topk(k)
        assert [e["token"] for e in top] == [_shown(engine, i) for i in best.indices.tolist()]
        assert all(e["bytes"] == list(e["token"].encode("utf-8")) for e in top)
        assert all(abs(a - b) <= TOL for a, b in zip(values, best.values.tolist(), strict=True))


def test_chat_without_logprobs_has_none(server):
    choice = _chat(server[0], messages=[{"role": "user", "content": "hi"}], max_tokens=2)["choices"][0]
    assert choice["logprobs"] is None


def test_streamed_chat_logprobs_join_to_the_non_streamed_ones(server):
    messages = [{"role": "user", "content": PROMPTS[2]}]
    body = {"model": NAME, "messages": messages, "max_tokens": 5, "temperature": 0, "logprobs": True}
    body |= {"top_logprobs": 2, "ignore_eos": True}
    whole = _chat(server[0], **body)["choices"][0]
    text, joined = "", []
    for c in _stream(server[0], {**body, "stream": True}, "/v1/chat/completions"):
        choice = c["choices"][0]
        text += choice["delta"].get("content", "")
        if choice["logprobs"] is not None:
            joined += choice["logprobs"]["content"]
    assert text == whole["message"]["content"]
    ref = whole["logprobs"]["content"]
    assert len(joined) == len(ref) == 5
    for a, b in zip(joined, ref, strict=True):
        assert a["token"] == b["token"] and a["bytes"] == b["bytes"] and abs(a["logprob"] - b["logprob"]) <= TOL
        assert [e["token"] for e in a["top_logprobs"]] == [e["token"] for e in b["top_logprobs"]]


def test_openai_client_reads_chat_logprobs(engine, client):
    messages = [{"role": "user", "content": PROMPTS[1]}]
    r = client.chat.completions.create(
        model=NAME, messages=messages, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 3
    ref = _ref_logprobs(engine, engine.encode_chat(messages))[-1]
    first = content[0]
    assert first.token == _shown(engine, ref.argmax().item()) and abs(first.logprob - ref.max().item()) <= TOL
    assert [t.token for t in first.top_logprobs] == [_shown(engine, i) for i in ref.topk(2).indices.tolist()]
    assert first.bytes == list(first.token.encode("utf-8"))


@pytest.mark.e2e
@pytest.mark.parametrize("ranks", [1, 2])
def test_dsv3_serve_command_scores_prompts(ckpt, engine, ranks):
    """``dsv3 serve --dtype float32`` (and under torchrun, where rank 1 replays the prompt's logits call):
    prompt and greedy logprobs equal Engine.logits', with chunked prefill."""
    proc, lines, _ = test_serve._launch_serve(ckpt, "--port", "0", "--prefill-chunk", "3", ranks=ranks)
    try:
        url = test_serve._serving_url(
            lines, "with .*tensor parallel over 2 processes" if ranks > 1 else "with continuous batching"
        )
        body = {"echo": True, "logprobs": 2, "max_tokens": 3, "temperature": 0, "return_token_ids": True}
        out = _complete(url, prompt=PROMPTS[:3], ignore_eos=True, **body)
        for prompt, choice in zip(PROMPTS[:3], out["choices"], strict=True):
            ids = engine.encode(prompt, chat=False)
            seq = ids + choice["token_ids"]
            ref = _ref_logprobs(engine, seq)
            got = choice["logprobs"]["token_logprobs"]
            assert got[0] is None and len(got) == len(ids) + 3
            for t in range(1, len(seq)):
                assert abs(got[t] - ref[t - 1, seq[t]].item()) <= TOL, (prompt, t)
        assert health(url)["slots_used"] == 0
    finally:
        if ranks > 1:
            assert test_serve._stop_group(proc) == []
        else:
            proc.terminate()
            proc.wait(WAIT_S)
