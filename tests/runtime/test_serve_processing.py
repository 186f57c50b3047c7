"""Penalties, logit_bias, top_k, min_p, min_tokens and stop_token_ids through ``dsv3 serve`` (float32, in process).

Each greedy token and log-probability is checked against a hand computation from :meth:`Engine.logits` and the
token counts (``expected_logits`` of test_logits_processing); sampled and MTP answers against ``Engine.generate``
with the same :class:`LogitsParams` (what ``dsv3 run`` calls).
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("fastapi", reason="dsv3 serve needs the 'serve' extra (fastapi, uvicorn)")
pytest.importorskip("httpx", reason="the serving tests need httpx")
pytest.importorskip("openai", reason="the serving tests use the openai client")

from dsv3.runtime.logits_processing import LogitsParams  # noqa: E402
from tests.runtime import test_serve  # noqa: E402
from tests.runtime.test_logits_processing import ARGMAX_TOL, expected_logits  # noqa: E402
from tests.runtime.test_serve import NAME, PROMPTS, _post  # noqa: E402

ckpt, engine, server, client = test_serve.ckpt, test_serve.engine, test_serve.server, test_serve.client  # its fixtures

TOL = 1e-4  # served (cached, batched) vs uncached float32 logits: ~1e-6 apart (as in test_serve_logprobs)
PENALTIES = dict(presence_penalty=0.6, frequency_penalty=0.9, repetition_penalty=1.7, logit_bias={5: 1.5, 9: -2.0})


def _body_fields(p: dict) -> dict:
    """LogitsParams fields as a request body spells them (logit_bias keys as strings, as the openai client sends)."""
    return {**p, "logit_bias": {str(k): v for k, v in p.get("logit_bias", {}).items()}} if "logit_bias" in p else p


def _ids(choice) -> list[int]:
    return choice.model_extra["token_ids"]


def test_penalized_tokens_and_logprobs_are_the_hand_computation(engine, client):
    prompt = PROMPTS[0]
    ids = engine.encode(prompt, chat=False)
    body = _body_fields(PENALTIES)
    r = client.completions.create(
        model=NAME,
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        logprobs=3,
        presence_penalty=body["presence_penalty"],
        frequency_penalty=body["frequency_penalty"],
        logit_bias=body["logit_bias"],
        extra_body={"repetition_penalty": body["repetition_penalty"], "return_token_ids": True, "ignore_eos": True},
    )
    gen, lp = _ids(r.choices[0]), r.choices[0].logprobs
    params = LogitsParams(**PENALTIES)
    assert gen == engine.generate([ids], 10, logits=params)[0].token_ids
    plain = client.completions.create(
        model=NAME,
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        extra_body={"return_token_ids": True, "ignore_eos": True},
    )
    assert _ids(plain.choices[0]) != gen  # the penalties changed the answer
    raw = engine.logits([ids + gen])[0]  # (T, V): row t predicts token t + 1
    for j, t in enumerate(gen):
        want = expected_logits(raw[len(ids) + j - 1], ids, gen[:j], params).log_softmax(-1)
        assert want[t] >= want.max() - ARGMAX_TOL, j  # greedy over the processed logits
        assert abs(lp.token_logprobs[j] - want[t].item()) <= TOL, j  # logprobs after penalties
        best = want.topk(3)
        shown = [engine.tokenizer.decode([i], skip_special_tokens=False) for i in best.indices.tolist()]
        assert list(lp.top_logprobs[j]) == shown
        assert all(abs(a - b) <= TOL for a, b in zip(lp.top_logprobs[j].values(), best.values.tolist(), strict=True))


def test_a_large_logit_bias_forces_the_chat_answer(engine, client):
    r = client.chat.completions.create(
        model=NAME,
        messages=[{"role": "user", "content": "hello"}],
        max_tokens=6,
        temperature=0,
        logit_bias={"10": 100},
        extra_body={"return_token_ids": True},
    )
    assert _ids(r.choices[0]) == [10] * 6 and r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content == " ".join([engine.tokenizer.decode([10])] * 6)


def test_min_tokens_and_stop_token_ids(engine, client):
    kw = dict(model=NAME, prompt=PROMPTS[2], max_tokens=10, temperature=0)  # its greedy tokens: no early repeats
    free = _ids(client.completions.create(**kw, extra_body={"return_token_ids": True, "ignore_eos": True}).choices[0])
    first = free[0]
    stopped = client.completions.create(**kw, extra_body={"return_token_ids": True, "stop_token_ids": [first]})
    assert _ids(stopped.choices[0]) == [first] and stopped.choices[0].finish_reason == "stop"
    later = next(t for j, t in enumerate(free) if j >= 2 and t not in free[:j])
    cut = client.completions.create(
        **kw, extra_body={"return_token_ids": True, "stop_token_ids": [later], "ignore_eos": True}
    )
    assert _ids(cut.choices[0]) == free[: free.index(later) + 1] and cut.choices[0].finish_reason == "stop"
    held = client.completions.create(
        **kw, extra_body={"return_token_ids": True, "stop_token_ids": [first], "min_tokens": 4}
    )
    toks = _ids(held.choices[0])
    assert len(toks) >= 4 and first not in toks[:4]
    ref = engine.generate(
        [engine.encode(PROMPTS[2], chat=False)], 10, logits=LogitsParams(min_tokens=4), stop_token_ids=[first]
    )[0]
    assert toks == ref.token_ids and held.choices[0].finish_reason == ref.finish_reason


SAMPLED = dict(top_k=5, min_p=0.05, presence_penalty=0.5, repetition_penalty=1.2, logit_bias={7: 2.0})


def test_seeded_sampling_with_processing_equals_generate(engine, client):
    ids = engine.encode(PROMPTS[3], chat=False)
    body = _body_fields(SAMPLED)
    r = client.completions.create(
        model=NAME,
        prompt=PROMPTS[3],
        max_tokens=12,
        temperature=1.0,
        top_p=0.9,
        seed=42,
        presence_penalty=body.pop("presence_penalty"),
        logit_bias=body.pop("logit_bias"),
        extra_body={**body, "return_token_ids": True},
    )
    ref = engine.generate([ids], 12, 1.0, 0.9, seed=42, logits=LogitsParams(**SAMPLED))[0]
    assert _ids(r.choices[0]) == ref.token_ids
    unprocessed = engine.generate([ids], 12, 1.0, 0.9, seed=42)[0]
    assert ref.token_ids != unprocessed.token_ids  # the processing changed the draws


def test_mtp_server_with_processing_equals_plain_decoding(engine):
    """Concurrent greedy requests with different processing (one with none) through --mtp 2 equal plain generate."""
    cases = [
        (PROMPTS[0], dict(PENALTIES, min_tokens=3)),
        (PROMPTS[2], dict(frequency_penalty=1.2, logit_bias={12: 2.0})),
        (PROMPTS[4], {}),
    ]
    with test_serve.serving(engine, mtp=2) as (url, scheduler):

        def ask(case):
            prompt, p = case
            r = _post(url, "/v1/completions", {"model": NAME, "prompt": prompt, "max_tokens": 12, "temperature": 0,
                                               "return_token_ids": True, **_body_fields(p)})  # fmt: skip
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["token_ids"]

        with ThreadPoolExecutor(len(cases)) as pool:
            got = list(pool.map(ask, cases))
        assert scheduler.counters["drafts"] > 0
    for (prompt, p), tokens in zip(cases, got, strict=True):
        ids = engine.encode(prompt, chat=False)
        assert tokens == engine.generate([ids], 12, logits=LogitsParams(**p))[0].token_ids, prompt
    assert got[0] != engine.generate([engine.encode(PROMPTS[0], chat=False)], 12)[0].token_ids


def test_seeded_mtp_server_with_processing_equals_generate_mtp(engine):
    ids = engine.encode(PROMPTS[3], chat=False)
    with test_serve.serving(engine, mtp=2) as (url, _):
        body = {"model": NAME, "prompt": PROMPTS[3], "max_tokens": 12, "temperature": 1.0, "seed": 7}
        r = _post(url, "/v1/completions", {**body, "return_token_ids": True, **_body_fields(SAMPLED)})
        assert r.status_code == 200, r.text
    ref = engine.generate([ids], 12, 1.0, 1.0, seed=7, mtp=2, logits=LogitsParams(**SAMPLED))[0]
    assert r.json()["choices"][0]["token_ids"] == ref.token_ids


BAD = [
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"repetition_penalty": "1"}, "repetition_penalty"),
    ({"logit_bias": {"96": 1}}, "logit_bias"),  # the vocabulary is 96
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"5": 101}}, "logit_bias"),
    ({"logit_bias": {"5": "1"}}, "logit_bias"),
    ({"top_k": -2}, "top_k"),
    ({"top_k": 1.5}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": -1}, "min_tokens"),
    ({"min_tokens": 6, "max_tokens": 5}, "min_tokens"),
    ({"min_tokens": 17}, "min_tokens"),  # more than the default 16 completion tokens
    ({"stop_token_ids": [96]}, "stop_token_ids"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids.0"),
    ({"stop_token_ids": list(range(96)), "min_tokens": 1}, "stop_token_ids"),  # nothing left to generate
]


@pytest.mark.parametrize(("fields", "param"), BAD)
@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_bad_processing_fields_are_400_naming_the_field(server, path, fields, param):
    where = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    if path != "/v1/completions" and fields.get("min_tokens") == 17:
        fields = {**fields, "max_tokens": 16}  # chat's default budget is the rest of the context
    r = _post(server[0], path, {"model": NAME, **where, **fields})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert len(r.json()["error"]["message"].splitlines()) == 1


def test_dsv3_run_flags_draw_what_the_server_draws(ckpt, client, capsys):
    """`dsv3 run --seed 42 --top-k 5 --min-p ... --logit-bias 7=2` (in process) and the server: the same tokens."""
    from dsv3.cli import main as cli_main

    flags = ["--top-k", "5", "--min-p", "0.05", "--presence-penalty", "0.5", "--repetition-penalty", "1.2"]
    flags += ["--logit-bias", "7=2", "--temperature", "1", "--top-p", "0.9", "--seed", "42", "--max-new-tokens", "12"]
    capsys.readouterr()
    rc = cli_main(["run", "--ckpt-path", str(ckpt), "--dtype", "float32", "--raw", "--output-format", "jsonl",
                   "--prompt", PROMPTS[3], *flags])  # fmt: skip
    out = capsys.readouterr().out
    assert rc == 0, out
    (record,) = [json.loads(line) for line in out.splitlines()]
    body = _body_fields(SAMPLED)
    r = client.completions.create(
        model=NAME,
        prompt=PROMPTS[3],
        max_tokens=12,
        temperature=1.0,
        top_p=0.9,
        seed=42,
        presence_penalty=body.pop("presence_penalty"),
        logit_bias=body.pop("logit_bias"),
        extra_body={**body, "return_token_ids": True},
    )
    assert record["token_ids"] == _ids(r.choices[0])


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--top-k", "-2"], "--top-k"),
        (["--logit-bias", "7"], "--logit-bias"),
        (["--repetition-penalty", "0"], "--repetition-penalty"),
        (["--min-tokens", "9", "--max-new-tokens", "5"], "--max-new-tokens"),
        (["--presence-penalty", "3"], "--presence-penalty"),
    ],
)
def test_dsv3_run_refuses_bad_processing_flags_in_one_line(ckpt, capsys, flags, named):
    from dsv3.cli import main as cli_main

    capsys.readouterr()
    rc = cli_main(["run", "--ckpt-path", str(ckpt), "--prompt", "x", *flags])
    err = capsys.readouterr().err
    assert rc == 2 and named in err and len(err.strip().splitlines()) == 1, err
