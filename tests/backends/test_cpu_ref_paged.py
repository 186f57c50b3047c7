"""cpu_ref's paged latent cache: writes land at their slots only, and paged attention is the contiguous
``mla_latent_attention`` over the entries the block table names, never reading anything else.

The conformance kit compares cpu_ref with itself, where a NaN read from a stale page would sit in both
outputs and pass; so the reference's own outputs are checked for being finite here.
"""

from __future__ import annotations

import pytest
import torch

from dsv3.backends.cpu_ref import attention, paged
from dsv3.conformance import Spec, cases_for
from dsv3.conformance.tolerances import ATTENTION_FP32, EXACT
from tests.helpers import assert_close

NAN = float("nan")


def _contiguous_and_paged(dtype: torch.dtype, extra: int = 0):
    """Random rows (kv, pe) of lengths seq_lens, and the same entries stored by paged_cache_write in a
    NaN-filled paged cache on random pages (one batched write, with NaN padding tokens at slot -1)."""
    g = torch.Generator().manual_seed(3)
    seq_lens, t, h, c, r, page_size = [9, 4, 13], 3, 4, 16, 6, 4
    width = -(-max(seq_lens) // page_size)
    # cpu_ref gathers every position the block table (width + 1 pages) can name: the contiguous rows as long
    b, s = len(seq_lens), (width + 1) * page_size + extra
    kv, pe = torch.randn(b, s, c, generator=g).to(dtype), torch.randn(b, s, r, generator=g).to(dtype)
    q_latent, q_pe = torch.randn(b, t, h, c, generator=g).to(dtype), torch.randn(b, t, h, r, generator=g).to(dtype)
    pages = torch.randperm(b * width + 2, generator=g)[: b * width].view(b, width)  # 2 pages nobody uses
    cache = torch.full((b * width + 2, page_size, c + r), NAN, dtype=dtype)
    block_table = torch.full((b, width + 1), -1, dtype=torch.int32)
    slots, new_kv, new_pe = [], [], []
    for row, n in enumerate(seq_lens):
        block_table[row, : -(-n // page_size)] = pages[row, : -(-n // page_size)].to(torch.int32)
        j = torch.arange(n)
        slots += [block_table[row, j // page_size].long() * page_size + j % page_size, torch.tensor([-1])]
        new_kv += [kv[row, :n], torch.full((1, c), NAN, dtype=dtype)]  # the padding token's values go nowhere
        new_pe += [pe[row, :n], torch.full((1, r), NAN, dtype=dtype)]
        kv[row, n:], pe[row, n:] = 1e3, NAN  # the contiguous cache's stale tail
    paged.paged_cache_write(cache, torch.cat(new_kv), torch.cat(new_pe), torch.cat(slots))
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    q_pos = seq.long().view(-1, 1) - t + torch.arange(t)  # (B, T)
    return (q_latent, q_pe, kv, pe, q_pos), (q_latent, q_pe, cache, block_table, seq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_is_latent_attention_over_the_gathered_entries(dtype):
    """Exact: cpu_ref gathers each row into the same (B, M * page_size, C) layout and calls the same
    function, and both forms zero what lies past a row's length; same operations on the same values."""
    contiguous, paged_args = _contiguous_and_paged(dtype)
    want = attention.mla_latent_attention(*contiguous, 0.3)
    got = paged.mla_paged_attention(*paged_args, 0.3)
    assert bool(torch.isfinite(got).all())
    assert_close(got, want, EXACT, f"paged vs contiguous, {dtype}")


def test_gather_pages_reads_each_rows_entries_and_zeros_past_its_length():
    (_, _, kv, pe, q_pos), (_, _, cache, block_table, seq) = _contiguous_and_paged(torch.float32)
    entries, valid = paged.gather_pages(cache, block_table, seq)  # (B, M * page_size, C + R), (B, M * page_size)
    assert torch.equal(valid, torch.arange(entries.shape[1]) < seq.view(-1, 1))
    assert entries.shape == (*kv.shape[:2], cache.shape[-1])
    for row, n in enumerate(seq.tolist()):
        assert torch.equal(entries[row, :n], torch.cat([kv[row, :n], pe[row, :n]], -1))
        assert torch.equal(entries[row, n:], torch.zeros_like(entries[row, n:]))  # not the NaN stored there


def test_paged_attention_against_a_longer_contiguous_cache():
    """A contiguous cache 5 entries longer than the longest row: the extra (masked) entries add exact
    zeros, but the longer reductions may be blocked in another order, so float32 summation-order tolerance."""
    contiguous, paged_args = _contiguous_and_paged(torch.float32, extra=5)
    got = paged.mla_paged_attention(*paged_args, 0.3)
    assert_close(got, attention.mla_latent_attention(*contiguous, 0.3), ATTENTION_FP32, "paged vs longer cache")


def test_cache_write_stores_at_slots_and_skips_negative_ones():
    cache = torch.arange(3 * 4 * 5, dtype=torch.float32).view(3, 4, 5)
    before = cache.clone()
    kv, pe = torch.full((4, 3), 7.0), torch.full((4, 2), -7.0)
    kv[2], pe[2] = 100.0, -100.0
    paged.paged_cache_write(cache, kv, pe, torch.tensor([9, -1, 3, -1]))
    assert torch.equal(cache[2, 1], torch.tensor([7.0, 7.0, 7.0, -7.0, -7.0]))  # slot 9 = page 2, offset 1
    assert torch.equal(cache[0, 3], torch.tensor([100.0, 100.0, 100.0, -100.0, -100.0]))  # slot 3 = page 0, offset 3
    untouched = torch.ones(3, 4, dtype=torch.bool)
    untouched[2, 1] = untouched[0, 3] = False
    assert torch.equal(cache[untouched], before[untouched])  # slot -1 did not wrap round to the last entry


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_outputs_of_the_kit_cases_are_finite(dtype):
    """Every paged attention case plants NaN in entries no row may read, and garbage past each row's
    pages in its block table; cpu_ref's answer stays finite (so the kit holds backends to a finite one)."""
    cases = cases_for(Spec("mla_paged_attention", dtype=dtype))
    assert {"random-pages", "shared-pages", "page-boundary", "causal-chunk", "671B-decode"} <= {c.name for c in cases}
    for case in cases:
        q_latent, q_pe, cache, block_table, seq_lens, scale = case.build().args
        assert bool(cache.isnan().any()) or case.name == "tiny", case.name
        assert bool((block_table < 0).any() | (block_table >= cache.shape[0]).any()), case.name
        out = paged.mla_paged_attention(q_latent, q_pe, cache, block_table, seq_lens, scale)
        assert out.shape == q_latent.shape and out.dtype == dtype
        assert bool(torch.isfinite(out).all()), case.name
