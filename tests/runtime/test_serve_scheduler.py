"""The serving scheduler without HTTP: cache rows (slots), continuous batching against generate(), MTP mode
(batched speculative steps against generate() and generate_speculative())."""

from __future__ import annotations

import queue
import threading
import time
from functools import partial

import pytest
import torch

import dsv3
from dsv3.errors import Dsv3Error
from dsv3.runtime.generate import SamplingParams, generate
from dsv3.runtime.serve.scheduler import Event, Request, Scheduler, SchedulerBusy
from dsv3.runtime.serve.text import TextStream, held_back
from dsv3.runtime.speculative import generate_speculative
from tests.helpers import make_checkpoint, pattern_tokens, train_on_patterns

WAIT_S = 60  # bound on any wait for the scheduler thread (tiny model: it takes well under a second)


@pytest.fixture(scope="module")
def engine(tiny_ckpt):
    return dsv3.load(tiny_ckpt, dtype="float32")


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, 12, (n,), generator=g).tolist()
    return [[0] + torch.randint(2, 96, (k,), generator=g).tolist() for k in lengths]


class Collector:
    """A request's sink that records its events (called from the scheduler thread)."""

    def __init__(self):
        self.events: queue.Queue[Event] = queue.Queue()

    def __call__(self, ev: Event) -> None:
        self.events.put(ev)

    def result(self) -> tuple[list[int], str]:
        tokens: list[int] = []
        while True:
            ev = self.events.get(timeout=WAIT_S)
            assert ev.error is None, ev.error
            tokens += ev.tokens
            if ev.finished:
                return tokens, ev.finish_reason


def test_forward_with_cache_rows_matches_rows_zero_to_b(engine):
    """rows= puts batch row i in cache row rows[i]; the hidden states equal a forward in rows 0..B-1."""
    model = engine.model
    prompts = torch.tensor([[0, 5, 9, 3], [0, 7, 7, 2]])
    positions = torch.arange(4).expand(2, 4)
    with torch.inference_mode():
        plain_cache = model.new_cache(2, 8)
        want = model(prompts, positions, plain_cache)
        nxt = model(torch.tensor([[4], [6]]), torch.tensor([[4], [4]]), plain_cache)
        cache = model.new_cache(5, 8)
        rows = torch.tensor([3, 1])
        got = model(prompts, positions, cache, rows=rows)
        got_next = model(torch.tensor([[4], [6]]), torch.tensor([[4], [4]]), cache, rows=rows)
    torch.testing.assert_close(got, want, rtol=0, atol=0)  # same arithmetic, only the cache rows differ
    torch.testing.assert_close(got_next, nxt, rtol=0, atol=0)
    for layer, plain in zip(cache.main, plain_cache.main, strict=True):
        for name, buf in cache.entries(layer).items():
            torch.testing.assert_close(buf[rows, :5], plain_cache.entries(plain)[name][:, :5], rtol=0, atol=0)
            assert not buf[[0, 2, 4]].any()  # the other slots are untouched


def hold_decode(sched: Scheduler, step: str = "_decode") -> threading.Event:
    """Make every decode step wait for the returned event (set it to let them run)."""
    gate = threading.Event()
    decode = getattr(sched, step)

    def held(rows):
        gate.wait(WAIT_S)
        decode(rows)

    setattr(sched, step, held)
    return gate


def _run(sched: Scheduler, prompts, max_tokens, **kw) -> list[tuple[list[int], str]]:
    sinks = [Collector() for _ in prompts]
    for p, m, s in zip(prompts, max_tokens, sinks, strict=True):
        sched.submit(Request(p, m, s, **kw))
    return [s.result() for s in sinks]


def test_continuous_batching_equals_generate_per_prompt(engine):
    """More requests than slots, different lengths: each equals generate() on that prompt alone (greedy)."""
    prompts = _prompts(7)
    max_tokens = [3, 9, 1, 6, 12, 4, 8]
    want = [
        generate(engine.model, [p], SamplingParams(m, eos_ids=engine.eos_ids))
        for p, m in zip(prompts, max_tokens, strict=True)
    ]
    sched = Scheduler(engine.model, max_batch=3, max_len=32)
    gate = hold_decode(sched)  # everything is queued before the first decode step
    sched.start()
    try:
        sinks = [Collector() for _ in prompts]
        for p, m, s in zip(prompts, max_tokens, sinks, strict=True):
            sched.submit(Request(p, m, s, stop_ids=frozenset(engine.eos_ids)))
        gate.set()
        got = [s.result() for s in sinks]
        stats = sched.stats()
    finally:
        sched.stop()
    for (ids, reason), ref in zip(got, want, strict=True):
        assert ids == ref.token_ids[0]
        assert reason == ref.finish_reasons[0]
    assert stats["slots_used"] == 0 and stats["waiting"] == 0
    assert stats["finished"] == len(prompts)
    assert stats["peak_batch"] == 3  # decode steps were shared by every slot


def test_seeded_sampling_matches_generate_alone(engine):
    """A seeded row draws with its own generator: the same tokens as generate() with that seed."""
    prompts = _prompts(3, seed=1)
    sched = Scheduler(engine.model, max_batch=4, max_len=32)
    sched.start()
    try:
        got = _run(sched, prompts, [10] * 3, temperature=0.9, top_p=0.95, seed=1234)
        again = _run(sched, prompts[:1], [10], temperature=0.9, top_p=0.95, seed=1234)
    finally:
        sched.stop()
    for p, (ids, _) in zip(prompts, got, strict=True):
        ref = generate(engine.model, [p], SamplingParams(10, 0.9, 0.95, 1234))
        assert ids == ref.token_ids[0]
    assert again[0][0] == got[0][0]


def test_cancel_frees_the_slot_and_busy_queue_refuses(engine):
    sched = Scheduler(engine.model, max_batch=1, max_len=64, max_waiting=1)
    gate = hold_decode(sched)
    sched.start()
    try:
        first, second = Collector(), Collector()
        r1 = Request([0, 4, 5], 50, first)
        sched.submit(r1)
        assert first.events.get(timeout=WAIT_S).tokens  # prefilled; its first decode step is held
        sched.submit(Request([0, 6], 2, second))  # waits: the only slot is busy
        with pytest.raises(SchedulerBusy):
            sched.submit(Request([0, 7], 2, Collector()))  # the queue (1) is full
        sched.cancel(r1)
        gate.set()
        ids, reason = second.result()  # got the freed slot
        assert len(ids) == 2 and reason == "length"
        stats = sched.stats()
    finally:
        sched.stop()
    assert stats["cancelled"] == 1 and stats["slots_used"] == 0
    assert stats["finished"] == 1  # only the second one ran to its end


@pytest.mark.parametrize("mtp", [0, 2])
def test_chunked_prefill_equals_generate_and_lets_running_requests_decode(engine, monkeypatch, mtp):
    """prefill_chunk=4: a 40-token prompt goes in 10 chunks with a decode step of the running request
    after each; every answer is what generate() gives for its prompt alone (float32, greedy)."""
    sched = Scheduler(engine.model, max_batch=2, max_len=64, mtp=mtp, prefill_chunk=4)
    name = "_prefill_mtp" if mtp else "_prefill"
    chunks: list[tuple[int, int]] = []  # (prompt length, decode steps so far) per prefill call
    prefill = getattr(sched, name)

    def spy(a, stop):
        chunks.append((len(a.req.prompt), sched.counters["steps"]))
        prefill(a, stop)

    monkeypatch.setattr(sched, name, spy)
    short, long_prompt = (
        _prompts(1, seed=6)[0],
        [0] + torch.randint(2, 96, (39,), generator=torch.Generator().manual_seed(8)).tolist(),
    )
    sched.start()
    try:
        first = Collector()
        sched.submit(Request(short, 24, first))
        head = first.events.get(timeout=WAIT_S).tokens  # running
        assert head
        second = Collector()
        sched.submit(Request(long_prompt, 6, second))
        got_long, (rest, reason) = second.result(), first.result()
        got_short = (list(head) + rest, reason)
        stats, prefilled = sched.stats(), sched.counters["prefill_tokens"]
    finally:
        sched.stop()
    for prompt, (ids, _) in ((short, got_short), (long_prompt, got_long)):
        assert ids == generate(engine.model, [prompt], SamplingParams(len(ids), eos_ids=())).token_ids[0]
    assert len(got_short[0]) == 24 and len(got_long[0]) == 6
    steps = [n for length, n in chunks if length == len(long_prompt)]
    assert len(steps) == 10 and steps == list(range(steps[0], steps[0] + 10))  # one decode step between chunks
    assert prefilled == len(short) + len(long_prompt) and stats["slots_used"] == stats["prefilling"] == 0


@pytest.mark.parametrize("mtp", [0, 2])
def test_health_counts_each_slot_once_when_a_prefill_ends(engine, mtp):
    """Seen from the first token's event (sent right after the prompt went in): one slot used, none prefilling."""
    sched = Scheduler(engine.model, max_batch=1, max_len=32, mtp=mtp, prefill_chunk=3)
    seen: list[dict] = []
    sink = Collector()

    def record(ev):
        if not seen:
            seen.append(sched.stats())
        sink(ev)

    sched.start()
    try:
        sched.submit(Request(_prompts(1, seed=7)[0] + [5, 6, 7], 3, record))
        sink.result()
        after = sched.stats()
    finally:
        sched.stop()
    assert (seen[0]["slots_used"], seen[0]["prefilling"]) == (1, 0)
    assert (after["slots_used"], after["prefilling"]) == (0, 0)


def test_negative_prefill_chunk_is_refused(engine):
    with pytest.raises(Dsv3Error, match="prefill_chunk must be an integer >= 0"):
        Scheduler(engine.model, max_batch=1, max_len=32, prefill_chunk=-1)


def test_mtp_mode_greedy_equals_plain_generate(engine):
    """Concurrent greedy requests in MTP mode decode together and answer what plain generation answers."""
    prompts = _prompts(3, seed=2)
    want = [generate(engine.model, [p], SamplingParams(6, eos_ids=engine.eos_ids)).token_ids[0] for p in prompts]
    sched = Scheduler(engine.model, max_batch=8, max_len=32, mtp=2)
    gate = hold_decode(sched, "_decode_mtp")  # every request is admitted before the first step
    sched.start()
    try:
        sinks = [Collector() for _ in prompts]
        for p, sink in zip(prompts, sinks, strict=True):
            sched.submit(Request(p, 6, sink, stop_ids=frozenset(engine.eos_ids)))
        while sched.stats()["slots_used"] + sched.stats()["finished"] < len(prompts):
            time.sleep(0.01)
        gate.set()
        got = [sink.result() for sink in sinks]
        stats = sched.stats()
    finally:
        sched.stop()
    assert [ids for ids, _ in got] == want
    assert stats["slots_total"] == 8 and stats["finished"] == 3 and stats["slots_used"] == 0
    assert stats["peak_batch"] == sum(len(ids) > 1 for ids in want)  # every unfinished request in one step
    assert 0 <= stats["accepted_drafts"] <= stats["drafts"] and stats["drafts"] % 2 == 0


def test_mtp_mode_long_prompt_joining_running_requests_keeps_steps_small(engine, monkeypatch):
    """A long prompt's MTP entries are made at its prefill: later batched steps run MTP over the window only."""
    model = engine.model
    calls: list[tuple[int, int]] = []
    mtp_forward = model.mtp_forward

    def spy(depth, hidden, *args, **kwargs):
        calls.append(tuple(hidden.shape[:2]))  # (B, T)
        return mtp_forward(depth, hidden, *args, **kwargs)

    monkeypatch.setattr(model, "mtp_forward", spy)
    sched = Scheduler(model, max_batch=4, max_len=96, mtp=2)
    sched.start()
    try:
        short = [Collector() for _ in range(3)]
        prompts = _prompts(3, seed=4)
        for p, sink in zip(prompts, short, strict=True):
            sched.submit(Request(p, 30, sink))
        for sink in short:  # all three are running
            assert sink.events.get(timeout=WAIT_S).tokens
        long_prompt = _prompts(1, seed=5)[0] * 6  # 66 tokens
        long_sink = Collector()
        sched.submit(Request(long_prompt, 10, long_sink))
        got, _ = long_sink.result()
        for sink in short:
            sink.result()
        window, peak = sched._spec.window, sched.stats()["peak_batch"]
    finally:
        sched.stop()
    assert got == generate(model, [long_prompt], SamplingParams(10, eos_ids=())).token_ids[0]
    assert peak == 4 and len(long_prompt) > 4 * window
    assert max(t for b, t in calls if b > 1) <= window  # batched steps: the window, never a whole prompt
    assert max(t for b, t in calls if b == 1) >= len(long_prompt) - 3  # the long prompt's own prefill


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny vocab-16 model whose MTP module is trained on progressions: drafts are often accepted."""
    path = make_checkpoint(tmp_path_factory.mktemp("mtp-serve") / "ckpt", seed=3, mtp=True, vocab_size=16)
    engine = dsv3.load(path, dtype="float32")
    train_on_patterns(engine.model, steps=60, seed=0)
    return engine


def test_mtp_mode_streams_accepted_drafts_and_matches_speculative_alone(trained):
    """Greedy and seeded sampled requests share MTP steps; each gets what it would get alone.

    Greedy rows equal plain greedy generation (they ride in a batch that also samples, so they go
    through rejection sampling with one-hot distributions); a seeded row draws exactly what
    generate_speculative draws for its prompt alone with that seed. Accepted drafts arrive as
    several tokens in one event.
    """
    model = trained.model
    g = torch.Generator().manual_seed(5)
    prompts = [[0] + pattern_tokens(1, n, 16, g)[0].tolist() for n in (3, 7, 4)]
    kinds = [dict(), dict(temperature=0.9, top_p=0.95, seed=77), dict()]
    sched = Scheduler(model, max_batch=4, max_len=40, mtp=2)
    sched.start()
    try:
        sinks = [Collector() for _ in prompts]
        for p, kw, sink in zip(prompts, kinds, sinks, strict=True):
            sched.submit(Request(p, 12, sink, **kw))
        events = []
        for sink in sinks:
            mine = []
            while not mine or not mine[-1].finished:
                mine.append(sink.events.get(timeout=WAIT_S))
            events.append(mine)
        stats = sched.stats()
    finally:
        sched.stop()
    got = [[t for ev in evs for t in ev.tokens] for evs in events]
    for p, kw, ids in zip(prompts, kinds, got, strict=True):
        params = SamplingParams(12, kw.get("temperature", 0.0), kw.get("top_p", 1.0), kw.get("seed"))
        want = (generate if not kw else partial(generate_speculative, k=2))(model, [p], params).token_ids[0]
        assert ids == want, kw
    assert max(len(ev.tokens) for evs in events for ev in evs) > 1  # drafts accepted and streamed together
    assert stats["accepted_drafts"] > 0 and stats["tokens"] == sum(len(ids) for ids in got)


def test_stop_pending_requests_get_an_error(engine):
    sched = Scheduler(engine.model, max_batch=1, max_len=64)
    gate = hold_decode(sched)
    sched.start()
    sinks = [Collector(), Collector()]
    sched.submit(Request([0, 4], 40, sinks[0]))
    assert sinks[0].events.get(timeout=WAIT_S).tokens
    sched.submit(Request([0, 5], 40, sinks[1]))
    stopper = threading.Thread(target=sched.stop)
    stopper.start()
    while not sched._stopping:  # stop() has asked before the held step finishes
        time.sleep(0.01)
    gate.set()
    stopper.join(WAIT_S)
    assert not sched.alive
    for s in sinks:
        last = s.events.get(timeout=WAIT_S)
        while not last.finished:
            last = s.events.get(timeout=WAIT_S)
        assert last.error is not None and "shutting down" in last.error
    with pytest.raises(SchedulerBusy):
        sched.submit(Request([0, 5], 4, Collector()))


# ------------------------------------------------------------ text: deltas and stop strings
def _word_decode(vocab: list[str]):
    return lambda ids: "".join(vocab[i] for i in ids)


def test_text_stream_cuts_at_a_stop_string_split_across_tokens():
    vocab = ["he", "llo", " wo", "rld", "!", " EN", "D", " more"]
    stream = TextStream(_word_decode(vocab), stop=("END",))
    out = []
    for i in [0, 1, 2, 3, 5, 6, 7]:
        delta, stopped = stream.add([i])
        out.append(delta)
        if stopped:
            break
    assert "".join(out) == "hello world "
    assert stopped and stream.text == "hello world "
    assert out[-2:] == [" ", ""]  # "EN" of " EN" was held back, then "D" made it the stop string


def test_text_stream_releases_held_text_when_no_stop_follows():
    vocab = ["a", "b", "c"]
    stream = TextStream(_word_decode(vocab), stop=("bx",))
    assert stream.add([0]) == ("a", False)
    assert stream.add([1]) == ("", False)  # "b" could start "bx"
    assert stream.add([2]) == ("bc", False)
    assert stream.add([1]) == ("", False)
    assert stream.finish() == "b"  # the end: nothing can follow


def test_held_back_is_the_longest_stop_prefix_at_the_end():
    assert held_back("xxab", ("abc", "b")) == 2
    assert held_back("xxa", ("abc",)) == 1
    assert held_back("xyz", ("abc",)) == 0


def test_incremental_decoding_waits_for_whole_characters(engine):
    """Byte-level pieces of one character: no U+FFFD is ever sent; joined deltas are the full decode."""
    tok_decode = lambda ids: bytes(ids).decode("utf-8", errors="replace")  # noqa: E731
    stream = TextStream(tok_decode)
    text = "né€😀!"
    data = list(text.encode())
    deltas = [stream.add([b])[0] for b in data]
    deltas.append(stream.finish())
    assert "\ufffd" not in "".join(deltas)
    assert "".join(deltas) == text


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread dies: expected
def test_a_failed_mirrored_call_stops_the_scheduler_instead_of_desyncing_ranks(engine, monkeypatch):
    """Tensor-parallel serving: a model error on rank 0 may leave the other ranks inside a collective, so
    MirroredModel turns it into MirrorBroken, which ends the scheduler (not just the step's requests)
    and keeps close() from sending anything more."""
    from dsv3.model.parallel import ParallelContext
    from dsv3.runtime.serve.mirror import MirroredModel

    mirror = MirroredModel(engine.model, ParallelContext())  # world 1: the same calls, nothing to send

    def fail(*_a, **_k):
        raise RuntimeError("out of memory (planted)")

    sched = Scheduler(mirror, max_batch=2, max_len=32)
    sched.start()
    try:
        sink = Collector()
        sched.submit(Request([0, 5, 9], 4, sink))
        assert sink.result()[0]  # a healthy mirrored model answers
        monkeypatch.setattr(engine.model, "forward", fail)  # nn.Module.__call__ -> forward
        broken = Collector()
        sched.submit(Request([0, 7], 4, broken))
        last = broken.events.get(timeout=WAIT_S)
        sched._thread.join(WAIT_S)
    finally:
        sched.stop()
    assert last.error is not None and "scheduler failed" in last.error and "planted" in last.error
    assert not sched.alive and "MirrorBroken" in sched.fatal and mirror.broken
    with pytest.raises(SchedulerBusy):
        sched.submit(Request([0, 5], 4, Collector()))
