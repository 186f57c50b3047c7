"""``n`` and ``best_of`` (a prompt prefilled once, its cache forked to the other choices) and ``GET /metrics``,
against a float32 server started here."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi", reason="dsv3 serve needs the 'serve' extra (fastapi, uvicorn)")
httpx = pytest.importorskip("httpx", reason="the serving tests need httpx")
openai = pytest.importorskip("openai", reason="the serving tests use the openai client")
parser = pytest.importorskip("prometheus_client.parser", reason="/metrics needs the 'serve' extra (prometheus_client)")

from dsv3.runtime.serve.scheduler import Scheduler  # noqa: E402
from tests.runtime import test_serve  # noqa: E402
from tests.runtime.test_serve import KEY, NAME, PROMPTS, WAIT_S, _post  # noqa: E402

ckpt, engine = test_serve.ckpt, test_serve.engine  # its fixtures


@pytest.fixture
def served(engine):
    """A fresh server per test (its counters start at 0), pages of 4 so prompts span full and partial pages."""
    original = Scheduler.__init__

    def small_pages(self, *args, **kw):
        original(self, *args, **{**kw, "page_size": 4})

    Scheduler.__init__ = small_pages
    try:
        with test_serve.serving(engine) as (url, scheduler):
            client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=WAIT_S)
            yield url, scheduler, client
    finally:
        Scheduler.__init__ = original


def test_n_with_a_seed_gives_reproducible_choices_each_drawn_with_seed_plus_j(engine, served):
    url, scheduler, client = served
    prompt = PROMPTS[4]
    kw = dict(model=NAME, prompt=prompt, max_tokens=8, temperature=1.0, seed=11, n=3)
    first = client.completions.create(**kw)
    again = client.completions.create(**kw)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.text for c in again.choices]  # reproducible
    assert texts == [engine.generate([prompt], 8, chat=False, temperature=1.0, seed=11 + j)[0].text for j in range(3)]
    assert len(set(texts)) > 1  # different draws, not one choice three times
    assert scheduler.counters["forked"] == 4  # two requests, each forked its prompt to two more choices


def test_greedy_n_2_gives_identical_choices_from_one_prefill(engine, served):
    url, scheduler, client = served
    prompt = PROMPTS[4]  # 9 tokens: two full pages of 4 shared, the partial third copied
    n_ids = len(engine.encode(prompt, chat=False))
    r = client.completions.create(model=NAME, prompt=prompt, max_tokens=10, temperature=0, n=2)
    want = engine.generate([prompt], 10, chat=False, temperature=0)[0].text
    assert [c.text for c in r.choices] == [want, want]
    assert scheduler.counters["prefill_tokens"] == n_ids  # prefilled once for both
    assert scheduler.counters["forked"] == 1
    assert r.usage.prompt_tokens == n_ids and r.usage.completion_tokens == 20
    h = test_serve.wait_for(url, lambda h: h["slots_used"] == 0, "the slots to be free")
    assert h["pages_used"] == 0  # the shared pages were released by both


def test_streamed_choices_reassemble_to_the_non_streamed_ones(served):
    url, scheduler, client = served
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0.9, seed=5, n=2)
    whole = [c.text for c in client.completions.create(**kw).choices]
    parts = ["", ""]
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            parts[c.index] += c.text
    assert parts == whole


def test_chat_n(engine, served):
    url, scheduler, client = served
    msgs = [{"role": "user", "content": PROMPTS[1]}]
    r = client.chat.completions.create(model=NAME, messages=msgs, max_tokens=5, temperature=0.8, seed=3, n=2)
    want = [engine.generate([PROMPTS[1]], 5, chat=True, temperature=0.8, seed=3 + j)[0].text for j in range(2)]
    assert [c.message.content for c in r.choices] == want


def test_best_of_returns_the_most_likely_sequence(served):
    url, scheduler, client = served
    kw = dict(model=NAME, prompt=PROMPTS[2], max_tokens=6, temperature=1.0, seed=21)
    all3 = client.completions.create(**kw, n=3, logprobs=0).choices
    totals = [sum(c.logprobs.token_logprobs) for c in all3]
    best = client.completions.create(**kw, n=1, best_of=3).choices
    assert len(best) == 1 and best[0].text == all3[totals.index(max(totals))].text
    assert best[0].logprobs is None  # not asked for
    two = client.completions.create(**kw, n=2, best_of=3, logprobs=0).choices
    ranked = sorted(range(3), key=lambda j: -totals[j])
    assert [c.text for c in two] == [all3[j].text for j in ranked[:2]]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"n": 2, "best_of": 1}, "best_of"),
        ({"best_of": 3, "stream": True}, "best_of"),
        ({"n": 0}, None),
        ({"n": 129}, None),
    ],
)
def test_bad_n_and_best_of_are_400s(served, body, param):
    url, _, _ = served
    r = _post(url, "/v1/completions", {"model": NAME, "prompt": "hi", **body})
    assert r.status_code == 400, r.text
    if param is not None:
        assert r.json()["error"]["param"] == param


def _metrics(url: str) -> dict:
    text = httpx.get(url + "/metrics", timeout=WAIT_S).text
    out = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"[{k}={v}]" for k, v in sorted(sample.labels.items()))
            out[key] = sample.value
    return out


def test_metrics_parse_and_move_as_requests_run(served):
    url, scheduler, client = served
    before = _metrics(url)
    assert before["dsv3_generation_tokens_total"] == 0 and before["dsv3_requests_waiting"] == 0
    for p in PROMPTS[:3]:
        client.completions.create(model=NAME, prompt=p, max_tokens=4, temperature=0)
    client.completions.create(model=NAME, prompt=PROMPTS[3], max_tokens=4, temperature=0, stream=True).close()
    assert _post(url, "/v1/completions", {"model": NAME, "prompt": "hi", "n": 0}).status_code == 400
    test_serve.wait_for(url, lambda h: h["slots_used"] == 0, "the slots to be free")
    after = _metrics(url)
    assert after["dsv3_http_requests_total[endpoint=/v1/completions][status=200]"] == 4
    assert after["dsv3_http_requests_total[endpoint=/v1/completions][status=400]"] == 1
    assert after["dsv3_generation_tokens_total"] >= 12  # the streamed one may stop early (closed)
    assert after["dsv3_time_to_first_token_seconds_count"] >= 3
    assert after["dsv3_e2e_request_latency_seconds_count"] >= 3
    assert after["dsv3_inter_token_latency_seconds_count"] >= 9  # 3 tokens after the first, 3 requests
    assert after["dsv3_prefill_tokens_total"] > 0 and after["dsv3_cache_pages_used"] == 0
    assert after["dsv3_scheduler_requests_total"] == 4
    assert 0 <= after["dsv3_prefix_cache_hit_rate"] <= 1
