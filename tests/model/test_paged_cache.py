"""The absorbed form's paged latent cache against the same model over contiguous latent strips.

The reference is the same absorbed model whose cache is a contiguous ``LayerCache`` per layer
(``kv (B, S, C)``, ``pe (B, S, R)``: the layout the graph used before paging, still taken by the
ONNX export), so the only difference is where entries live. Pages are small (4 positions) and
drawn from a pool shuffled with several seeds, so rows' pages are not contiguous nor in order.
Float32: the paged attention gathers the very entries the strips hold and runs the same latent
attention over them, so logits agree to 1e-6 x max|logit| (a few fp32 ulps of the logit scale, room
for a different batching of the same matmuls) and greedy tokens are identical.
"""

from __future__ import annotations

import threading

import pytest
import torch

import dsv3
from dsv3.model.cache import ModelCache, PagedLayerCache, contiguous_cache, page_table, paged_step
from dsv3.runtime.generate import SamplingParams, generate
from dsv3.runtime.serve.scheduler import Request, Scheduler
from dsv3.runtime.speculative import generate_speculative
from tests.helpers import make_v2_checkpoint

REL_TOL = 1e-6  # float32 logits, relative to the largest |logit| (see the module docstring)
SEEDS = (0, 1, 2)
WAIT_S = 60  # bound on the wait for the scheduler thread (tiny model: well under a second)
PROMPTS = [[0, 5, 9, 12, 40, 41, 7, 3, 8, 60, 2], [0, 33, 2, 17]]


@pytest.fixture(scope="module")
def model(tiny_ckpt):
    return dsv3.load(tiny_ckpt, dtype="float32", progress=False).model


@pytest.fixture(scope="module")
def v2_model(tmp_path_factory):
    """A tiny DeepSeek-V2 checkpoint (softmax routing, no MTP) through the same graph."""
    return dsv3.load(make_v2_checkpoint(tmp_path_factory.mktemp("v2") / "ckpt"), dtype="float32", progress=False).model


def use_cache(monkeypatch, model, layout: str | int) -> None:
    """Make model.new_cache allocate ``layout``: "contiguous", or paged with that page seed (pages of 4)."""
    if layout == "contiguous":
        monkeypatch.setattr(model, "new_cache", lambda b, n, **_: contiguous_cache(model, b, n))
    else:

        def paged(b, n, page_size=4, num_pages=None):  # the scheduler's pool: num_pages, handed out as needed
            assert page_size == 4
            return type(model).new_cache(model, b, n, 4, layout, num_pages=num_pages)

        monkeypatch.setattr(model, "new_cache", paged)


def decode_logits(model, cache: ModelCache, steps: int) -> tuple[list[torch.Tensor], list[list[int]]]:
    """Right-padded prefill of PROMPTS, then greedy decode: every forward's logits and the tokens."""
    width = max(len(p) for p in PROMPTS)
    tokens = torch.tensor([p + [1] * (width - len(p)) for p in PROMPTS])
    with torch.inference_mode():
        hidden = model(tokens, torch.arange(width).expand(2, width), cache)
        lens = torch.tensor([len(p) for p in PROMPTS])
        logits = [model.logits(hidden[torch.arange(2), lens - 1])]
        out = [[], []]
        pos = lens
        for _ in range(steps):
            nxt = logits[-1].argmax(-1)
            for row, tok in zip(out, nxt.tolist(), strict=True):
                row.append(tok)
            logits.append(model.logits(model(nxt.unsqueeze(1), pos.unsqueeze(1), cache)[:, 0]))
            pos = pos + 1
    return logits, out


def assert_close_logits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for g, w in zip(got, want, strict=True):
        err, scale = float((g - w).abs().max()), float(w.abs().max())
        assert err <= REL_TOL * scale, f"max |diff| {err:.3g} vs logit scale {scale:.3g}"


@pytest.mark.parametrize("naive_prefill", [True, False])
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("version", ["v3", "v2"])
def test_paged_decode_matches_contiguous_strips(request, version, seed, naive_prefill):
    """Prefill (naive from gathered pages, or latent through the block table) then 12 decode steps, on a
    tiny V3 and a tiny V2 checkpoint."""
    model = request.getfixturevalue("model" if version == "v3" else "v2_model")
    model.set_naive_prefill(naive_prefill)
    try:
        paged = model.new_cache(2, 32, page_size=4, page_seed=seed)
        assert isinstance(paged.main[0], PagedLayerCache) and paged.block_table.shape == (2, 8)
        got, got_tokens = decode_logits(model, paged, 12)
        want, want_tokens = decode_logits(model, contiguous_cache(model, 2, 32), 12)
    finally:
        model.set_naive_prefill(True)
    assert got_tokens == want_tokens
    assert_close_logits(got, want)
    # what the pages hold is what the strips hold, position by position
    ref = contiguous_cache(model, 2, 32)
    decode_logits(model, ref, 12)
    for layer, plain in zip(paged.main, ref.main, strict=True):
        for name, buf in paged.entries(layer).items():
            n = 11 + 12  # every position written (prefill width 11, then 12 decode steps of row 0)
            err, scale = float((buf[0, :n] - plain.tensors[name][0, :n]).abs().max()), float(buf[0, :n].abs().max())
            assert err <= REL_TOL * scale, (name, err, scale)  # 0 with the naive prefill: same computation


@pytest.mark.parametrize("layout", SEEDS)
def test_generate_and_mtp_speculative_tokens_match_contiguous(model, monkeypatch, layout):
    """Engine-level runs: plain greedy generation and speculative decoding with 2 drafts (MTP layers'
    caches paged too, their windows repeating positions) give the contiguous cache's tokens."""
    params = SamplingParams(10, eos_ids=())
    use_cache(monkeypatch, model, "contiguous")
    want = generate(model, PROMPTS, params).token_ids
    want_mtp = generate_speculative(model, PROMPTS, params, 2).token_ids
    use_cache(monkeypatch, model, layout)
    assert generate(model, PROMPTS, params).token_ids == want
    assert generate_speculative(model, PROMPTS, params, 2).token_ids == want_mtp == want


@pytest.mark.parametrize("mtp", [0, 2])
def test_scheduler_chunked_prefill_matches_contiguous(model, monkeypatch, mtp):
    """The server's scheduler (slots = cache rows) with 3-token prefill chunks over pages of 4 that its page pool
    hands out as the two requests grow (so their pages interleave)."""

    def run() -> list[list[int]]:
        sched = Scheduler(model, max_batch=2, max_len=40, mtp=mtp, prefill_chunk=3, page_size=4)
        tokens: list[list[int]] = [[], []]
        done = [threading.Event(), threading.Event()]

        def sink(i):
            def put(ev):
                assert ev.error is None, ev.error
                tokens[i].extend(ev.tokens)
                if ev.finished:
                    done[i].set()

            return put

        sched.start()
        try:
            for i, p in enumerate(PROMPTS):
                sched.submit(Request(p, 8, sink(i)))
            assert all(d.wait(WAIT_S) for d in done)
        finally:
            sched.stop()
        return tokens

    use_cache(monkeypatch, model, "contiguous")
    want = run()
    use_cache(monkeypatch, model, 1)
    assert run() == want
    assert all(len(t) == 8 for t in want)


def test_page_table_is_shuffled_and_covers_every_row():
    table = page_table(3, 10, 4, seed=5, device="cpu")  # 3 pages a row
    assert table.dtype == torch.int32 and table.shape == (3, 3)
    assert sorted(table.flatten().tolist()) == list(range(9))
    assert table.flatten().tolist() != list(range(9))


def test_slot_mapping_writes_a_repeated_position_once_and_attends_per_token():
    table = torch.tensor([[5, 2], [0, 7]], dtype=torch.int32)
    positions = torch.tensor([[0, 0, 3, 4], [1, 2, 3, 4]])  # row 0 repeats position 0 (a clamped window)
    step = paged_step(table, 4, positions, torch.tensor([1, 0]))  # batch rows in cache rows 1, 0
    # cache row 1's pages are 0, 7 and cache row 0's 5, 2: slot = page * 4 + position % 4
    assert step.slot_mapping.tolist() == [-1, 0, 3, 28, 21, 22, 23, 8]
    assert step.per_token  # row 0's positions are not consecutive: one attention row per query
    assert step.seq_lens.tolist() == [1, 1, 4, 5, 2, 3, 4, 5]
    assert step.block_table.tolist() == [[0, 7]] * 4 + [[5, 2]] * 4
    consecutive = paged_step(table, 4, torch.tensor([[2, 3], [6, 7]]), None)
    assert not consecutive.per_token and consecutive.seq_lens.tolist() == [4, 8]
    assert consecutive.slot_mapping.tolist() == [22, 23, 30, 31]


@pytest.mark.parametrize("seed", SEEDS)
def test_forward_at_repeated_and_scattered_positions_matches_contiguous(model, seed):
    """Rows whose new tokens are not their last T positions (a repeated one, gaps, rewrites of earlier
    entries): every query still sees exactly the keys up to its own position."""
    prompt = torch.tensor([[0, 5, 9, 12, 40, 41, 7, 3, 8, 60], [0, 33, 2, 17, 4, 4, 9, 1, 2, 3]])
    tokens, positions = torch.tensor([[11, 11, 13], [21, 22, 23]]), torch.tensor([[6, 6, 7], [3, 5, 9]])
    out = []
    for cache in (model.new_cache(2, 16, page_size=4, page_seed=seed), contiguous_cache(model, 2, 16)):
        with torch.inference_mode():
            model(prompt, torch.arange(10).expand(2, 10), cache)
            out.append(model.logits(model(tokens, positions, cache)))
    err, scale = float((out[0] - out[1]).abs().max()), float(out[1].abs().max())
    assert err <= REL_TOL * scale, f"max |diff| {err:.3g} vs logit scale {scale:.3g}"
