"""The server's page pool: allocation, reference counts, prefix keys and LRU eviction; the scheduler admitting by
free pages, preempting when the pool runs out, and reusing cached prompt pages (prefix caching)."""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.errors import Dsv3Error
from dsv3.runtime.generate import SamplingParams, generate
from dsv3.runtime.logits_processing import LogitsParams
from dsv3.runtime.serve.pages import PagePool
from dsv3.runtime.serve.scheduler import Request, Scheduler
from tests.helpers import make_checkpoint
from tests.runtime.test_serve_scheduler import Collector, hold_decode


# ------------------------------------------------------------ the pool alone
def test_pool_hands_out_each_page_once_and_takes_them_back():
    pool = PagePool(6, page_size=4, prefix_caching=False)
    a, b = pool.allocate(4), pool.allocate(2)
    assert sorted(a + b) == list(range(6)) and pool.available == 0
    assert pool.allocate(1) is None  # nothing taken when it cannot be met
    pool.release(b)
    assert pool.available == 2 and pool.stats()["pages_used"] == 4
    with pytest.raises(RuntimeError, match="released more often"):
        pool.release(b)


def test_prefix_keys_name_the_whole_prefix_and_cover_the_lookahead():
    pool = PagePool(8, page_size=4)
    tokens = list(range(10, 23))  # 13 tokens: 3 full pages
    keys = pool.keys(tokens)
    assert len(keys) == 3 and len(set(keys)) == 3
    assert pool.keys(tokens[:8]) == keys[:2]  # a key depends on its prefix only
    other = pool.keys([99] + tokens[1:])
    assert not set(other) & set(keys)  # a different first page changes every later key
    assert pool.keys(tokens, extra="fp8") != keys
    mtp = PagePool(8, page_size=4, lookahead=2)
    assert len(mtp.keys(tokens)) == 2  # page 2 would need tokens 12 and 13: only 13 are known
    changed = tokens[:4] + [7] + tokens[5:]  # token 4 is in page 1, and page 0's MTP entries read it
    assert mtp.keys(changed)[0] != mtp.keys(tokens)[0]


def test_cached_pages_are_shared_by_reference_and_evicted_least_recently_used():
    pool = PagePool(4, page_size=2)
    first, second = [0, 1, 2, 3, 4, 5], [9, 9, 8, 8]
    k1, k2 = pool.keys(first), pool.keys(second)
    p1 = pool.allocate(3)
    pool.register(p1, k1)
    p2 = pool.allocate(1)
    pool.register(p2, k2[:1])
    assert pool.match(k1, limit=2) == p1[:2]  # shared while p1 still holds them
    assert pool.refs[p1[0]] == 2
    pool.release(p1)
    pool.release(p1[:2])
    pool.release(p2)
    assert pool.stats()["pages_cached"] == 4 and pool.available == 4  # cached, unreferenced: evictable
    assert pool.match(k2, limit=2) == p2  # used again: now the most recently used
    pool.release(p2)
    got = pool.allocate(3)  # evicts first's three pages (least recently used), keeps second's
    assert sorted(got) == sorted(p1) and pool.evicted == 3
    assert pool.match(k1, limit=3) == [] and pool.match(k2, limit=1) == p2


# ------------------------------------------------------------ the scheduler on a small pool
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny V3 checkpoint (with an MTP layer) whose positions reach the long prompts below."""
    path = make_checkpoint(tmp_path_factory.mktemp("pages") / "tiny", seed=3, mtp=True, max_position_embeddings=1536)
    return dsv3.load(path, dtype="float32")


def _prompts(n: int, length: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [[0] + torch.randint(2, 96, (length - 1,), generator=g).tolist() for _ in range(n)]


def _serve(sched: Scheduler, prompts, max_tokens: int, **kw) -> tuple[list[list[int]], dict]:
    """Submit everything before the first decode step; each request's tokens and the stats after."""
    gate = hold_decode(sched, "_decode_mtp" if sched.mtp else "_decode")
    sched.start()
    try:
        sinks = [Collector() for _ in prompts]
        for p, s in zip(prompts, sinks, strict=True):
            sched.submit(Request(p, max_tokens, s, **kw))
        gate.set()
        got = [s.result()[0] for s in sinks]
        return got, sched.stats()
    finally:
        sched.stop()


def _alone(engine, prompts, max_tokens: int, **kw) -> list[list[int]]:
    """What each prompt gets by itself (one generate() call per prompt length, rows are independent)."""
    return [generate(engine.model, [p], SamplingParams(max_tokens, **kw)).token_ids[0] for p in prompts]


def test_64_requests_of_200_tokens_complete_in_a_4096_token_pool(engine):
    """64 concurrent requests (20-token prompts, 180 tokens each) in a pool of 4096 positions, a fifth of their
    12,800: admitted by free pages, preempted and recomputed when decoding runs out of pages; every answer is
    the one the prompt gets alone, so nothing streamed was lost or repeated (float32, greedy)."""
    prompts = _prompts(64, 20, seed=1)
    sched = Scheduler(engine.model, max_batch=64, max_len=200, max_total_tokens=4096)
    assert sched.pool.num_pages == 64  # 64-position pages: one 200-token request needs 4 of them
    got, stats = _serve(sched, prompts, 180)
    want = generate(engine.model, prompts, SamplingParams(180, eos_ids=())).token_ids  # same length: no padding
    assert got == want
    assert stats["preempted"] > 0 and stats["finished"] == 64
    assert stats["pages_used"] == 0 and stats["slots_used"] == 0


@pytest.mark.parametrize("mtp", [0, 2])
def test_preemption_loses_nothing_and_repeats_nothing(engine, mtp):
    """A pool that holds two or three requests: greedy answers (plain and speculative) equal each prompt's
    generate() alone, and seeded sampling draws the same tokens after a preemption as without one."""
    prompts = _prompts(6, 9, seed=2)
    sched = Scheduler(engine.model, max_batch=6, max_len=48, mtp=mtp, max_total_tokens=112, page_size=8)
    got, stats = _serve(sched, prompts, 36)
    assert stats["preempted"] > 0
    assert got == _alone(engine, prompts, 36, eos_ids=())
    if mtp:
        return
    sched = Scheduler(engine.model, max_batch=6, max_len=48, max_total_tokens=112, page_size=8)
    got, stats = _serve(sched, prompts, 36, temperature=0.8, seed=77)
    assert stats["preempted"] > 0
    assert got == _alone(engine, prompts, 36, eos_ids=(), temperature=0.8, seed=77)
    # a penalty reads the tokens generated so far: a resumed request keeps them
    penalties = LogitsParams(frequency_penalty=1.5, presence_penalty=0.5)
    sched = Scheduler(engine.model, max_batch=6, max_len=48, max_total_tokens=112, page_size=8)
    got, stats = _serve(sched, prompts, 36, processing=penalties)
    assert stats["preempted"] > 0
    assert got == _alone(engine, prompts, 36, eos_ids=(), logits=penalties)


def test_pool_smaller_than_one_request_is_refused(engine):
    with pytest.raises(Dsv3Error, match="--max-total-tokens 100 cannot hold one request of --max-model-len 200"):
        Scheduler(engine.model, max_batch=4, max_len=200, max_total_tokens=100)


@pytest.mark.parametrize("mtp", [0, 2])
def test_shared_system_prompt_is_prefilled_once(engine, mtp):
    """32 requests sharing a 1,000-token system prompt: with prefix caching it is prefilled once (counted), and
    every answer equals the one with caching off (float32, greedy)."""
    system = _prompts(1, 1000, seed=5)[0]
    prompts = [system + q for q in _prompts(32, 12, seed=6)]
    results = {}
    for caching in (True, False):
        sched = Scheduler(engine.model, max_batch=8, max_len=1040, mtp=mtp, prefix_caching=caching, prefill_chunk=256)
        results[caching] = _serve(sched, prompts, 4)
    (on, on_stats), (off, off_stats) = results[True], results[False]
    assert on == off
    assert off_stats["prefill_tokens"] == 32 * 1012 and off_stats["prefix_hit_tokens"] == 0
    hit = 960  # 15 full pages of 64 within the 1,000 shared tokens
    assert on_stats["prefix_hit_tokens"] == 31 * hit
    assert on_stats["prefill_tokens"] == 32 * 1012 - 31 * hit  # the shared pages went in once
    assert on_stats["pages_cached"] >= 15


def test_a_scored_prompt_is_prefilled_whole_even_when_cached(engine):
    """Prompt log-probabilities (echo) need the logits at every prompt position: a cached prefix is not skipped."""
    prompt = _prompts(1, 40, seed=9)[0]
    sched = Scheduler(engine.model, max_batch=2, max_len=48, page_size=8)
    sched.start()
    try:
        runs = []
        for _ in range(2):
            sink = Collector()
            sched.submit(Request(prompt, 2, sink, logprobs=0, prompt_logprobs=True))
            events = [sink.events.get(timeout=60)]
            while not events[-1].finished:
                events.append(sink.events.get(timeout=60))
            runs.append(next(e.prompt_logprobs for e in events if e.prompt_logprobs is not None))
        stats = sched.stats()
    finally:
        sched.stop()
    assert len(runs[0]) == len(runs[1]) == len(prompt) - 1
    assert [lp.logprob for lp in runs[0]] == pytest.approx([lp.logprob for lp in runs[1]], abs=1e-5)
    assert stats["pages_cached"] >= 4 and stats["prefix_hit_tokens"] == 0


def test_a_failed_first_sample_ends_every_forked_choice(engine, monkeypatch):
    """n choices forked from one prefill: if their first sample fails, all of them get the error and free their pages."""
    prompt = _prompts(1, 20, seed=4)[0]
    sched = Scheduler(engine.model, max_batch=4, max_len=48, page_size=8)

    sample, calls = sched._sample, []

    def broken_once(logits, rows):  # the prompt's first sample fails; later ones would not
        calls.append(len(rows))
        if len(calls) == 1:
            raise RuntimeError("sampling broke")
        return sample(logits, rows)

    monkeypatch.setattr(sched, "_sample", broken_once)
    gate = hold_decode(sched)
    sched.start()
    try:
        sinks = [Collector() for _ in range(3)]
        for s in sinks:
            sched.submit(Request(prompt, 4, s, group=7))
        gate.set()
        errors = [s.events.get(timeout=60).error for s in sinks]
        stats = sched.stats()
    finally:
        sched.stop()
    assert all(e is not None and "sampling broke" in e for e in errors)
    assert calls == [3]  # one sample for the three choices, and none after: nothing was left decoding
    assert stats["forked"] == 2 and stats["errors"] == 3
    assert stats["slots_used"] == 0 and stats["pages_used"] == 0
