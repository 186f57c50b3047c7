"""Captured decode steps (``dsv3.runtime.graphs``) on a CPU, through ``dsv3.runtime.graph_replay``.

``record_replay`` has a CUDA graph's semantics (the same operators on the same memory, Python values
fixed at capture, host syncs refused), so these tests check what a GPU run relies on: static buffers
refilled each step, padding rows that leave live rows alone, one graph per bucket, the eager fallbacks.

"capturable": the model with cpu_ref's operators except two, swapped for sync-free equivalents of what a
GPU backend runs: the routed experts on cpu_ref's gathered path (what cpu_ref runs on an accelerator) and a
cache write that stores every entry at its slot with ``index_copy_`` (as a kernel does; it refuses a
negative slot loudly, and no caller here makes one: prompts prefill at consecutive positions). Plain
cpu_ref groups tokens by expert with ``unique_consecutive`` and masks the write with a boolean index, so
its capture fails: the fallback test.

Float32 comparisons of a replayed step with the eager step use max |diff| <= 1e-5 x max |logit|: the
captured step pads the batch to its bucket and attends over the cache's full block table (masked), so
matrix products and softmax sums run over other shapes, which reorders float32 sums (~1e-7 relative per
operation); a wrong row, position or cache slot moves logits by far more.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dsv3
from dsv3.backends.cpu_ref import moe as cpu_ref_moe
from dsv3.runtime.generate import SamplingParams, generate
from dsv3.runtime.graph_replay import CaptureError, record_replay
from dsv3.runtime.graphs import DecodeGraphs, backend_capture, bucket_for, capture_sizes
from dsv3.runtime.serve.scheduler import Request, Scheduler
from tests.runtime.test_serve_scheduler import Collector

REL_TOL = 1e-5


def _index_copy_write(cache: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    cache.view(-1, cache.shape[-1]).index_copy_(0, slot_mapping, torch.cat([kv, pe], dim=-1).to(cache.dtype))


def _with_capture(engine: dsv3.Engine) -> dsv3.Engine:
    model = engine.model
    model.backend_info = dataclasses.replace(model.backend_info, capture_graph=record_replay)
    return engine


@pytest.fixture
def plain(tiny_ckpt) -> dsv3.Engine:
    """cpu_ref as it is, offering record_replay as its capture."""
    return _with_capture(dsv3.load(tiny_ckpt, dtype="float32", progress=False))


@pytest.fixture
def capturable(tiny_ckpt, monkeypatch) -> dsv3.Engine:
    """The module docstring's sync-free model, offering record_replay as its capture."""
    engine = _with_capture(dsv3.load(tiny_ckpt, dtype="float32", progress=False))
    monkeypatch.setattr(cpu_ref_moe, "use_gathered", lambda x, ids, experts: True)
    ops = dataclasses.replace(engine.model.ops, paged_cache_write=_index_copy_write)
    for module in engine.model.modules():
        if hasattr(module, "ops"):
            module.ops = ops
    return engine


PROMPTS = [[0, 5, 9, 14, 3], [0, 7, 2], [0, 40, 41, 42, 43, 44, 45]]
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


def test_capture_sizes_and_buckets():
    assert capture_sizes(1) == (1,)
    assert capture_sizes(3) == (1, 2, 4)
    assert capture_sizes(8) == (1, 2, 4, 8)
    assert capture_sizes(20) == (1, 2, 4, 8, 16, 24)
    assert capture_sizes(1000, limit=40) == (1, 2, 4, 8, 16, 24, 32, 40)
    sizes = capture_sizes(20)
    assert [bucket_for(n, sizes) for n in (1, 2, 3, 5, 8, 9, 17, 24)] == [1, 2, 4, 8, 8, 16, 24, 24]
    assert bucket_for(25, sizes) is None
    with pytest.raises(ValueError):
        capture_sizes(0)


def test_record_replay_reads_static_buffers_and_refuses_host_syncs():
    a, acc = torch.zeros(3), torch.zeros(3)

    def step() -> torch.Tensor:
        acc.add_(a * 2 + 1)  # an in-place write to memory the step did not make (a cache)
        return acc.sum().unsqueeze(0)

    replay = record_replay(step)
    a.fill_(1.0)  # refill the static input in place, as DecodeGraphs does
    first = replay()
    assert acc.tolist() == [4.0, 4.0, 4.0]  # capture ran once (1 each), the replay read a = 1 (3 each)
    assert first.tolist() == [12.0]
    assert replay() is first  # the same output tensor, refilled
    for bad in (lambda: a[a > 0].sum(), lambda: torch.full((1,), float(a.sum())), lambda: a.nonzero().float()):
        with pytest.raises(CaptureError):
            record_replay(bad)


def test_replayed_decode_equals_eager(capturable):
    model = capturable.model
    eager = generate(model, PROMPTS, GREEDY, enforce_eager=True)
    replayed = generate(model, PROMPTS, GREEDY)
    assert replayed.token_ids == eager.token_ids
    assert eager.stats["graph_replays"] == 0 and eager.stats["eager_steps"] == GREEDY.max_new_tokens - 1
    assert replayed.stats["graph_replays"] == GREEDY.max_new_tokens - 1
    assert replayed.stats["captured_buckets"] == [4]  # 3 rows + 1 padding row


def test_a_replay_that_keeps_capture_time_inputs_is_caught(capturable, monkeypatch):
    """The planted bug: static positions never refilled after capture. Replays then decode every step
    at the capture's positions, and the tokens part from the eager ones: record_replay does not re-run
    the Python that made the step, so such bugs show on a CPU."""
    model = capturable.model
    eager = generate(model, PROMPTS, GREEDY, enforce_eager=True)
    real_fill = DecodeGraphs._fill

    def stale_fill(self, tokens, positions, rows, size):
        if self.graphs:  # after the first capture, positions are no longer copied in
            positions = self._static[1][: tokens.shape[0], 0].clone()
        return real_fill(self, tokens, positions, rows, size)

    monkeypatch.setattr(DecodeGraphs, "_fill", stale_fill)
    assert generate(model, PROMPTS, GREEDY).token_ids != eager.token_ids


def test_each_bucket_is_captured_once_and_padding_leaves_live_rows_alone(capturable):
    """Steps of 1, 3, 2, 4 and 1 live rows (rows joining and leaving, as in serving) over two caches
    prefilled alike: replayed logits equal the eager ones step by step."""
    model = capturable.model
    prompt = [[0, 3, 4, 5, 6, 7]] * 4
    caches = []
    for _ in range(2):
        cache = model.new_cache(5, 32)
        dsv3.runtime.generate.prefill(model, prompt, cache)
        caches.append(cache)
    graphs = DecodeGraphs(model, caches[1], pad_row=4, max_batch=4, capture=record_replay)
    pos = [6, 6, 6, 6]
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        for live in ([2], [0, 1, 3], [1, 2], [0, 1, 2, 3], [3]):
            rows = torch.tensor(live)
            tokens = torch.randint(2, 96, (len(live),), generator=gen)
            positions = torch.tensor([pos[r] for r in live])
            want = DecodeGraphs(model, caches[0], 4, 4, None).eager(tokens, positions, rows)
            got = graphs(tokens, positions, rows)
            scale = want.abs().max()
            assert (got - want).abs().max() <= REL_TOL * scale, f"rows {live}"
            for r in live:
                pos[r] += 1
    assert graphs.stats() == {
        "graph_replays": 5,
        "eager_steps": 0,
        "captured_buckets": [1, 2, 4],
        "failed_buckets": [],
    }


def test_a_step_that_syncs_falls_back_to_eager_once_per_bucket(plain):
    lines: list[str] = []
    model = plain.model
    eager = generate(model, PROMPTS, GREEDY, enforce_eager=True)
    cache = model.new_cache(len(PROMPTS) + 1, 32)
    logits = model.logits(dsv3.runtime.generate.prefill(model, PROMPTS, cache))
    graphs = DecodeGraphs(model, cache, len(PROMPTS), len(PROMPTS), record_replay, warn=lines.append)
    tokens, positions = logits.argmax(-1), torch.tensor([len(p) for p in PROMPTS])
    got = [tokens.tolist()]
    with torch.inference_mode():
        for _ in range(GREEDY.max_new_tokens - 1):
            tokens = graphs(tokens, positions, None).argmax(-1)
            positions = positions + 1
            got.append(tokens.tolist())
    assert [list(col) for col in zip(*got, strict=True)] == eager.token_ids
    assert len(lines) == 1 and "graph capture of decode batch 4 failed" in lines[0] and "runs eagerly" in lines[0]
    assert graphs.stats()["failed_buckets"] == [4] and graphs.stats()["graph_replays"] == 0


def test_no_capture_without_the_capability_or_past_the_largest_bucket(tiny_ckpt, capturable):
    cpu_ref = dsv3.load(tiny_ckpt, dtype="float32", progress=False)
    assert cpu_ref.model.backend_info.capture_graph is None  # cpu_ref does not capture
    assert backend_capture(cpu_ref.model) is None
    assert backend_capture(capturable.model) is record_replay
    assert backend_capture(capturable.model, enforce_eager=True) is None
    model = capturable.model
    cache = model.new_cache(4, 16)
    graphs = DecodeGraphs(model, cache, pad_row=3, max_batch=2, capture=record_replay)  # buckets (1, 2)
    with torch.inference_mode():
        graphs(torch.tensor([4, 5, 6]), torch.tensor([0, 0, 0]), None)  # 3 rows: past the largest bucket
    assert graphs.stats()["eager_steps"] == 1 and graphs.stats()["captured_buckets"] == []


def test_triton_backends_capture_only_on_a_gpu(monkeypatch):
    from dsv3.backends.triton_kernels import graph_capture

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # CPU tensors through the interpreter: nothing to capture
    assert graph_capture.capture_graph() is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert graph_capture.capture_graph() is graph_capture.capture_cuda_graph


def test_serving_replays_decode_steps_with_the_same_answers(capturable):
    model = capturable.model
    prompts = [[0, 5, 9], [0, 7, 2, 8, 8, 1, 3], [0, 40], [0, 11, 12, 13]]
    max_tokens = [6, 3, 8, 5]
    answers = {}
    for eager in (True, False):
        sched = Scheduler(model, max_batch=3, max_len=32, enforce_eager=eager)
        sched.start()
        try:
            sinks = [Collector() for _ in prompts]
            for p, m, s in zip(prompts, max_tokens, sinks, strict=True):
                sched.submit(Request(p, m, s))
            answers[eager] = [s.result() for s in sinks]
            stats = sched.stats()["decode_graphs"]
        finally:
            sched.stop()
        if eager:
            assert stats["graph_replays"] == 0
        else:
            assert stats["graph_replays"] > 0 and stats["eager_steps"] == 0 and stats["failed_buckets"] == []
    assert answers[False] == answers[True]
