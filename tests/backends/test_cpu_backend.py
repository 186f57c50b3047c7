"""The cpu backend: its paged MLA attention (a C kernel reading the pages in place) against cpu_ref's, its
registration, and what it declines.

Tolerances are the conformance kit's for the operator (``tolerance_for``): float32 softmax 5e-5 (scores are
float32 sums of up to C + R products in another order), bfloat16 2^-6 (the output's rounding plus the
reference's intermediate roundings). Every entry of the cache that a row must not read holds NaN (bytes
0xFF in the FP8 layout), and ``assert_close`` requires finite outputs: a kernel reading one entry too many,
the wrong page or a stale page fails.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dsv3 import registry
from dsv3.backends.cpu import native, plugin
from dsv3.backends.cpu import paged as cpu_paged
from dsv3.backends.cpu_ref import paged as ref_paged
from dsv3.backends.cpu_ref import plugin as ref_plugin
from dsv3.conformance.tolerances import tolerance_for
from dsv3.errors import Dsv3Error
from dsv3.hookspecs import CONTRACT_VERSION, OP_NAMES, WEIGHT_OPS, OpRequest
from dsv3.model import fp8_cache
from tests.helpers import assert_close

ROOT = Path(__file__).resolve().parents[2]
needs_kernels = pytest.mark.skipif(
    native.library() is None, reason=f"the cpu backend's kernels cannot be built here: {native.unavailable_reason()}"
)


def _rows(g: torch.Generator, seq_lens: list[int], page_size: int, share: dict[int, tuple[int, int]]):
    """Block table (B, M + 1) int32 of random, permuted pages (2 spare pages nobody uses), entries past a
    row's pages -1 or out of range; ``share[b] = (a, k)``: row b's first k pages are row a's. Also the
    (P, page_size) bool of entries some row reads."""
    need = [-(-n // page_size) for n in seq_lens]
    total = sum(need) - sum(k for _, k in share.values()) + 2
    free = torch.randperm(total, generator=g).tolist()
    pages: list[list[int]] = []
    for b, n in enumerate(need):
        a, k = share.get(b, (b, 0))
        mine = list(pages[a][:k]) if k else []
        while len(mine) < n:
            mine.append(free.pop())
        pages.append(mine)
    table = torch.empty((len(seq_lens), max(need) + 1), dtype=torch.int32)
    used = torch.zeros((total, page_size), dtype=torch.bool)
    for b, (n, mine) in enumerate(zip(seq_lens, pages, strict=True)):
        table[b] = -1 if b % 2 else total + 5  # never read
        table[b, : len(mine)] = torch.tensor(mine, dtype=torch.int32)
        for j in range(n):
            used[mine[j // page_size], j % page_size] = True
    return table, used, total


CASES = {
    # name: (seq_lens, T, H, C, R, page_size, shared prefixes)
    "one-entry": ([1], 1, 1, 4, 2, 2, {}),
    "boundaries": ([4, 5, 8, 9, 1, 3], 1, 4, 32, 8, 4, {}),  # k * page, k * page + 1, one token, a partial page
    "shared": ([10, 6, 13], 1, 4, 32, 8, 4, {1: (0, 2), 2: (0, 1)}),  # row 1 ends inside row 0's page
    "random-long": ([300, 64, 65, 129], 1, 8, 128, 32, 64, {3: (0, 2)}),  # the mid config's shapes
    "chunk": ([10, 3, 17], 3, 5, 48, 6, 4, {2: (0, 2)}),  # T = 3 across page boundaries, causal
}


def _case(name: str, dtype: torch.dtype, fp8: torch.dtype | None = None, seed: int = 0):
    seq_lens, t, h, c, r, page_size, share = CASES[name]
    g = torch.Generator().manual_seed(seed)
    table, used, total = _rows(g, seq_lens, page_size, share)
    b = len(seq_lens)
    q_latent, q_pe = torch.randn(b, t, h, c, generator=g), torch.randn(b, t, h, r, generator=g)
    kv, pe = torch.randn(total * page_size, c, generator=g), torch.randn(total * page_size, r, generator=g)
    if fp8 is None:
        cache = torch.cat([kv, pe], -1).view(total, page_size, c + r).to(dtype)
        cache[~used] = float("nan")  # stale: freed pages and the rest of last pages
    else:
        kv = kv * torch.exp(torch.randn(total * page_size, 1, generator=g))  # tiles of different scales
        cache = fp8_cache.encode_entries(kv.to(dtype), pe.to(dtype), fp8).view(total, page_size, -1)
        cache.view(torch.uint8)[~used] = 0xFF  # a NaN latent code, scale and roped key
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return (q_latent.to(dtype), q_pe.to(dtype), cache, table, seq, 0.125)


@needs_kernels
@pytest.mark.parametrize("name", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_paged_attention_matches_cpu_ref(name, dtype):
    args = _case(name, dtype)
    want = ref_paged.mla_paged_attention(*args)
    got = cpu_paged.mla_paged_attention(*args)
    assert_close(got, want, tolerance_for("mla_paged_attention", "hp", "none", dtype), f"{name} {dtype}")


@needs_kernels
@pytest.mark.parametrize("fp8", [torch.float8_e4m3fn, torch.float8_e4m3fnuz])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["boundaries", "shared", "chunk"])
def test_paged_attention_over_the_fp8_cache_matches_cpu_ref(name, dtype, fp8):
    args = _case(name, dtype, fp8)
    want = ref_paged.mla_paged_attention(*args)
    got = cpu_paged.mla_paged_attention(*args)
    assert_close(got, want, tolerance_for("mla_paged_attention", "hp", "none", dtype), f"{name} {dtype} {fp8}")


@needs_kernels
def test_each_row_reads_only_its_own_pages():
    """Changing a page that row 0 does not list changes nothing of row 0; changing one it lists does."""
    q_latent, q_pe, cache, table, seq, scale = _case("shared", torch.float32)
    before = cpu_paged.mla_paged_attention(q_latent, q_pe, cache, table, seq, scale)
    mine = set(table[0, : -(-int(seq[0]) // 4)].tolist())
    other = next(p for p in table[2, :4].tolist() if p not in mine)  # row 2's own page
    cache[other] = 7.0
    after = cpu_paged.mla_paged_attention(q_latent, q_pe, cache, table, seq, scale)
    assert torch.equal(after[0], before[0]) and not torch.equal(after[2], before[2])


@needs_kernels
def test_thread_count_does_not_change_the_result():
    """Work is split by (row, head chunk), each summed in one order: 1 and 2 threads agree bit for bit."""
    args = _case("random-long", torch.float32)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = cpu_paged.mla_paged_attention(*args)
        torch.set_num_threads(2)
        two = cpu_paged.mla_paged_attention(*args)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(one, two)


@needs_kernels
def test_a_page_outside_the_pool_is_one_clear_error():
    q_latent, q_pe, cache, table, seq, scale = _case("boundaries", torch.float32)
    table[3, 1] = cache.shape[0]  # row 3 (9 entries) uses pages 0..2
    with pytest.raises(Dsv3Error, match=r"block_table row 3 .*outside \[0, "):
        cpu_paged.mla_paged_attention(q_latent, q_pe, cache, table, seq, scale)
    seq[0] = table.shape[1] * 4 + 1  # longer than its block table
    with pytest.raises(Dsv3Error, match=r"seq_lens\[0\]"):
        cpu_paged.mla_paged_attention(q_latent, q_pe, cache, table, seq, scale)


def test_registered_in_tree_like_the_others():
    """The entry point, the package and its C sources in pyproject.toml (read as text: tomllib is 3.11+)."""
    text = (ROOT / "pyproject.toml").read_text()
    group = text.split('[project.entry-points."dsv3.backends"]', 1)[1].split("\n[", 1)[0]
    assert re.search(r'^cpu = "dsv3\.backends\.cpu\.plugin"$', group, re.M)
    assert re.search(r'^\s+"dsv3\.backends\.cpu",$', text, re.M)
    assert re.search(r'^"dsv3\.backends\.cpu" = \["csrc/\*\.c"\]$', text, re.M)
    for source in native.SOURCES:
        assert (ROOT / "backends" / "cpu" / "csrc" / source).is_file()
    info = plugin.dsv3_backend_info()
    assert (info.name, info.contract_version, info.device) == ("cpu", CONTRACT_VERSION, "cpu")


@needs_kernels
def test_implements_only_paged_attention_and_declines_the_rest():
    backend = registry.make_backend(plugin, dist="dsv3")
    assert backend.unusable_reason is None
    reference = registry.make_backend(ref_plugin, dist="dsv3")
    for dtype in (torch.float32, torch.bfloat16):
        table = registry.resolve_ops(backend, ("hp",), "none", dtype, reference)
        assert table.sources["mla_paged_attention"] == "cpu"
        others = {f"{op}[hp]" if op in WEIGHT_OPS else op for op in OP_NAMES} - {"mla_paged_attention"}
        assert set(table.fallbacks) == others
    assert plugin.dsv3_op_mla_paged_attention(OpRequest(dtype=torch.float16)) is None  # no float16 kernel


@needs_kernels
def test_passes_the_quick_conformance_kit():
    """The kit's quick cases (float32 and bfloat16, compute-dtype and both FP8 caches; ~2 s)."""
    from dsv3.conformance.runner import run_conformance

    report = run_conformance(registry.make_backend(plugin, dist="dsv3"), quick=True)
    assert report.ok and {row.op for row in report.rows} == {"mla_paged_attention"}
    assert len(report.rows) == 6  # 2 dtypes x (compute-dtype cache, e4m3fn, e4m3fnuz)
