"""Structured output (xgrammar): the grammar mask in the logits stage, in plain, speculative (MTP) and served decoding.

On the embedded model (``dsv3.load()``: a byte-level BPE tokenizer of 4096 ids, with an MTP layer): seeded
``json_schema`` completions all validate, ``json_object`` output parses, greedy MTP equals plain decoding under a
grammar (with drafts accepted), streaming gives the same text, and bad grammars are 400s naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

pytest.importorskip("xgrammar", reason="structured output needs xgrammar (the serve and test extras)")
jsonschema = pytest.importorskip("jsonschema", reason="the structured-output tests validate with jsonschema")
pytest.importorskip("fastapi", reason="dsv3 serve needs the 'serve' extra (fastapi, uvicorn)")
openai = pytest.importorskip("openai", reason="the serving tests use the openai client")

import dsv3  # noqa: E402
from dsv3.runtime.grammar import GrammarCompiler  # noqa: E402
from dsv3.runtime.logits_processing import LogitsParams, RowLogits, penalize  # noqa: E402
from tests.runtime import test_serve  # noqa: E402
from tests.runtime.test_serve import KEY, SETTINGS, WAIT_S, _post  # noqa: E402

NAME = SETTINGS.model_name
# Every string and number is bounded: even one token per character, a completion ends within 49 tokens + EOS
SCHEMA = {
    "type": "object",
    "properties": {
        "a": {"type": "string", "maxLength": 4},
        "b": {"type": "boolean"},
        "c": {"type": "integer", "minimum": 0, "maximum": 99},
        "d": {"enum": ["red", "green", "blue"]},
    },
    "required": ["a", "b", "c", "d"],
}
MAX_TOKENS = 60
SERVE = dataclasses.replace(SETTINGS, max_model_len=96, max_tokens_limit=MAX_TOKENS)
FORMAT = {"type": "json_schema", "json_schema": {"name": "thing", "schema": SCHEMA}}


@pytest.fixture(scope="module")
def engine():
    return dsv3.load()


@pytest.fixture(scope="module")
def compiler(engine):
    return GrammarCompiler(engine.tokenizer, engine.cfg.vocab_size)


@pytest.fixture(scope="module")
def served(engine):
    with test_serve.serving(engine, SERVE, max_batch=16) as (url, scheduler):
        yield url, scheduler, openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT_S)


@pytest.fixture(scope="module")
def served_mtp(engine):
    with test_serve.serving(engine, SERVE, max_batch=4, mtp=2) as (url, scheduler):
        yield url, scheduler, openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT_S)


def test_fifty_seeded_json_schema_completions_all_validate(served):
    _, scheduler, client = served
    choices = []
    for k in range(5):  # 5 x n=10 (choice j of a request draws with seed + j): the test server queues 16
        r = client.chat.completions.create(
            model=NAME,
            messages=[{"role": "user", "content": "Describe a thing."}],
            max_tokens=MAX_TOKENS,
            temperature=1.0,
            seed=100 * k,
            n=10,
            response_format=FORMAT,
        )
        choices += r.choices
    assert len(choices) == 50
    texts = []
    for c in choices:
        assert c.finish_reason == "stop", c.message.content  # the grammar ended it, on EOS
        jsonschema.validate(json.loads(c.message.content), SCHEMA)
        texts.append(c.message.content)
    assert len(set(texts)) > 10  # seeded draws, not one forced string


def test_unconstrained_sampling_does_not_give_json(served):
    """The control for the test above: without response_format the same draws are not JSON of that schema."""
    _, _, client = served
    r = client.chat.completions.create(
        model=NAME, messages=[{"role": "user", "content": "Describe a thing."}], max_tokens=20, seed=7, n=5
    )
    for c in r.choices:
        with pytest.raises(ValueError):
            jsonschema.validate(json.loads(c.message.content), SCHEMA)


def test_json_object_output_parses(served):
    _, _, client = served
    r = client.completions.create(
        model=NAME,
        prompt="A JSON object:",
        max_tokens=MAX_TOKENS,
        temperature=1.0,
        seed=3,
        n=8,
        extra_body={"response_format": {"type": "json_object"}},
    )
    stopped = [c.text for c in r.choices if c.finish_reason == "stop"]
    assert len(stopped) >= 4  # an object has no bound on its size: one cut at max_tokens is not a failure
    for c in r.choices:
        assert c.text.startswith("{")
    for text in stopped:
        assert isinstance(json.loads(text), dict), text
    free = client.completions.create(model=NAME, prompt="A JSON object:", max_tokens=8, temperature=1.0, seed=3, n=8)
    assert not any(c.text.startswith("{") for c in free.choices)  # the control: the grammar made them objects


def test_greedy_mtp_equals_plain_under_a_grammar(engine, compiler):
    params = LogitsParams(grammar=compiler.json_schema(SCHEMA))
    prompts = ["Hello", "The weather today", "x = "]
    plain = engine.generate(prompts, MAX_TOKENS, logits=params)
    free = engine.generate(prompts, MAX_TOKENS)
    for mtp in (1, 2):
        spec = engine.generate(prompts, MAX_TOKENS, logits=params, mtp=mtp)
        assert [c.token_ids for c in spec] == [c.token_ids for c in plain]
        assert sum(sum(c.mtp["accepted"]) for c in spec) > 0  # drafts were checked against the grammar and kept
    for c, f in zip(plain, free, strict=True):
        jsonschema.validate(json.loads(c.text), SCHEMA)
        assert c.finish_reason == "stop" and c.token_ids != f.token_ids


def test_served_greedy_mtp_equals_plain_and_streams_the_same_text(served, served_mtp):
    body = dict(
        model=NAME, messages=[{"role": "user", "content": "Describe a thing."}], max_tokens=MAX_TOKENS, temperature=0
    )
    plain = served[2].chat.completions.create(**body, response_format=FORMAT)
    spec = served_mtp[2].chat.completions.create(**body, response_format=FORMAT)
    assert spec.choices[0].message.content == plain.choices[0].message.content
    assert spec.choices[0].finish_reason == plain.choices[0].finish_reason == "stop"
    for client in (served[2], served_mtp[2]):
        chunks = list(client.chat.completions.create(**body, response_format=FORMAT, stream=True))
        text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
        assert text == plain.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_guided_choice_and_regex(served):
    _, _, client = served
    for seed in range(3):
        r = client.completions.create(
            model=NAME,
            prompt="Pick:",
            max_tokens=20,
            temperature=1.0,
            seed=seed,
            extra_body={"guided_choice": ["alpha", "beta", "gamma delta"]},
        )
        assert r.choices[0].text in ("alpha", "beta", "gamma delta") and r.choices[0].finish_reason == "stop"
        r = client.completions.create(
            model=NAME,
            prompt="A date:",
            max_tokens=20,
            temperature=1.0,
            seed=seed,
            extra_body={"guided_regex": r"[0-9]{4}-[0-9]{2}-[0-9]{2}"},
        )
        assert re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", r.choices[0].text)


@pytest.mark.parametrize(
    "extra, param",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
            "response_format",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a+"}, "guided_regex"),
        ({"guided_regex": "("}, "guided_regex"),
        ({"guided_choice": []}, "guided_choice"),
        ({"guided_grammar": "root ::= "}, "guided_grammar"),
        ({"response_format": {"type": "json_object"}, "ignore_eos": True}, "response_format"),
        ({"response_format": {"type": "json_object"}, "min_tokens": 2}, "min_tokens"),
    ],
)
def test_bad_structured_output_is_a_400_naming_the_field(served, extra, param):
    body = {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, **extra}
    r = _post(served[0], "/v1/chat/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and f"'{param}'" in err["message"], err


def test_text_response_format_is_free_text(served):
    _, _, client = served
    body = dict(model=NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8, temperature=0)
    a = client.chat.completions.create(**body, response_format={"type": "text"})
    b = client.chat.completions.create(**body)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_drafted_positions_get_the_mask_after_the_drafts_before_them(engine, compiler):
    """penalize with appended drafts: position p's allowed set is a fresh matcher's after history + drafts[:p];
    the row's matcher is where it was afterwards (rolled back), and a position after a rejected draft is free."""
    grammar = compiler.json_schema(SCHEMA)
    vocab = engine.cfg.vocab_size
    tok = engine.tokenizer
    history = tok.encode('{"a": "x', add_special_tokens=False)
    drafts = tok.encode('y", "b', add_special_tokens=False)
    stop = list(engine.eos_ids)

    def allowed_after(tokens: list[int]) -> torch.Tensor:
        r = RowLogits(LogitsParams(grammar=grammar), [], stop, vocab, "cpu", generated=tokens)
        assert r.grammar.rejected == 0
        return torch.isfinite(penalize(torch.zeros(1, vocab), [r])[0])

    row = RowLogits(LogitsParams(grammar=grammar), [], stop, vocab, "cpu", generated=history)
    n_pos = len(drafts) + 1
    out = penalize(torch.zeros(1, n_pos, vocab), [row], torch.tensor([drafts]))[0]  # (P, V)
    for p in range(n_pos):
        want = allowed_after(history + drafts[:p])
        assert torch.equal(torch.isfinite(out[p]), want), p
        assert 0 < int(want.sum()) < vocab
    assert torch.equal(torch.isfinite(penalize(torch.zeros(1, vocab), [row])[0]), allowed_after(history))
    after = tok.encode('{"a": "xy", ', add_special_tokens=False)  # next must be '"b"': '}' is not allowed
    row = RowLogits(LogitsParams(grammar=grammar), [], stop, vocab, "cpu", generated=after)
    bad = tok.encode("}", add_special_tokens=False)
    assert len(bad) == 1
    out = penalize(torch.zeros(1, 2, vocab), [row], torch.tensor([bad]))[0]
    assert out[0, bad[0]] == -float("inf") and torch.isfinite(out[1]).all()  # unreachable: left free


def test_a_grammar_the_tokenizer_cannot_spell_is_refused_not_sampled_from_nothing(tmp_path):
    """A word-level tokenizer has no '{': the request is refused up front, and generate raises rather than
    sampling from all -inf logits."""
    from tests.helpers import add_tiny_tokenizer, make_checkpoint

    path = make_checkpoint(tmp_path / "tiny", seed=4)
    add_tiny_tokenizer(path)
    words = dsv3.load(path, dtype="float32")
    grammar = GrammarCompiler(words.tokenizer, words.cfg.vocab_size).json_object()
    assert not grammar.can_start(list(words.eos_ids))
    with pytest.raises(dsv3.errors.Dsv3Error, match="allows no token"):
        words.generate(["hello world"], 4, logits=LogitsParams(grammar=grammar))


def test_logprobs_are_those_of_the_constrained_distribution(engine, served):
    """logprobs come after the grammar mask: the first token's is log_softmax over the allowed tokens, so it is
    higher than the same token's unconstrained one, and a disallowed token shows -9999 (MIN_LOGPROB)."""
    _, _, client = served
    kw = dict(model=NAME, prompt="Pick:", max_tokens=1, temperature=0, logprobs=5)
    r = client.completions.create(**kw, extra_body={"guided_choice": ["zebra", "yak"], "return_token_ids": True})
    first = r.choices[0].model_extra["token_ids"][0]
    ids = engine.encode("Pick:", chat=False)
    raw = engine.logits([ids])[0, -1].log_softmax(-1)  # (V,) float32, unconstrained
    constrained = r.choices[0].logprobs.token_logprobs[0]
    assert engine.decode([first]) in ("z", "ze", "zeb", "zebr", "zebra", "y", "ya", "yak")
    assert constrained > raw[first].item() + 1e-3  # renormalized over a handful of tokens, not 4096
    tops = r.choices[0].logprobs.top_logprobs[0]
    assert any(v == -9999.0 for v in tops.values())  # fewer than 5 tokens allowed: the rest masked
