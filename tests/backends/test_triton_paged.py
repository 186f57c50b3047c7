"""The paged latent cache kernels (``paged_cache_write``, ``mla_paged_attention``) against cpu_ref.

Runs on CPU through Triton's interpreter, set up as in ``test_triton_kernels`` (whose TOL and
assert_close are reused). Every attention case runs with the wrapper's interpreter tiling (one
large tile), with the tiles a GPU launch picks (``paged.gpu_blocks``: BLOCK_H 16, BLOCK_S 32 at
C = 512 in bf16 and 16 in fp32), with and without split-KV. Every cache entry that is not one of a
row's first ``seq_len`` positions is NaN (the rest of last pages, spare pages), and block-table
entries past a row's pages are -1 or a page that does not exist: an output that is finite and
matches shows none of them was read.

Tolerances (max |got - want| / max |want|): fp32 1e-5, the same fp32 products summed in another
order, with exp2 of prescaled scores instead of exp (a few 2^-24 relative); bf16 1e-2, both sides
round the float32 result once to bfloat16 (2^-8 relative spacing). The cache write is a copy (or
a cast rounded to nearest even, as torch's): compared bit for bit, NaN entries included.
"""

from __future__ import annotations

import sys

import pytest
import torch

from dsv3.backends.cpu_ref import paged as ref
from dsv3.backends.triton_kernels import ops
from dsv3.backends.triton_kernels.runtime import INTERPRET_ENV, KernelArgumentError
from dsv3.backends.triton_kernels.target import AMD, NVIDIA
from dsv3.hookspecs import OpRequest
from tests.backends.test_triton_kernels import BF16, F32, TOL, assert_close, gen, rand

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

SCALE = 0.3
NAN = float("nan")


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """The paged kernel module, imported (or already imported) under TRITON_INTERPRET=1."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(INTERPRET_ENV, "1")
        mod = sys.modules.get("dsv3.backends.triton_kernels.paged")
        if mod is not None and type(mod._paged_mla_kernel).__name__ != "InterpretedFunction":
            pytest.skip("the Triton kernels were already compiled for a GPU in this process")
        yield ops._k().paged


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of a float tensor (NaN == NaN, -0 != 0)."""
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


# ----------------------------------------------------------------------------- layout of the test caches
def make_rows(seq_lens: list[int], page_size: int, spare: int, seed: int, share=()):
    """(block_table (B, M) int32, num_pages, used (P, page_size) bool): rows on random pages.

    share: (a, b, k): row b's first k pages are row a's. M is one column wider than needed; the
    entries past a row's pages alternate -1 and a page that does not exist.
    """
    need = [-(-n // page_size) for n in seq_lens]
    num_pages = sum(need) - sum(k for _, _, k in share) + spare
    free = torch.randperm(num_pages, generator=gen(seed)).tolist()
    pages: list[list[int]] = []
    for b, n in enumerate(need):
        mine = next((list(pages[a][:k]) for a, row, k in share if row == b), [])
        while len(mine) < n:
            mine.append(free.pop())
        pages.append(mine)
    table = torch.empty((len(seq_lens), max(need) + 1), dtype=torch.int32)
    for b, mine in enumerate(pages):
        table[b] = -1 if b % 2 == 0 else num_pages + 7
        table[b, : len(mine)] = torch.tensor(mine, dtype=torch.int32)
    return table, num_pages, used_entries(table, seq_lens, num_pages, page_size)


def used_entries(table: torch.Tensor, seq_lens: list[int], num_pages: int, page_size: int) -> torch.Tensor:
    """(P, page_size) bool: the entries that are one of some row's first seq_lens[b] positions."""
    used = torch.zeros((num_pages, page_size), dtype=torch.bool)
    for b, length in enumerate(seq_lens):
        for j in range(length):
            used[table[b, j // page_size], j % page_size] = True
    return used


# name: (seq_lens, T, H, C, R, page_size, spare pages, shared prefixes)
CASES = {
    "decode-random-pages": ([5, 40, 17], 1, 5, 32, 8, 16, 3, ()),
    # row 1 ends inside a page it shares with row 0; row 2 shares row 0's first page and goes on alone
    "decode-shared-pages": ([40, 20, 37], 1, 4, 32, 8, 16, 2, ((0, 1, 2), (0, 2, 1))),
    "decode-page-boundaries": ([16, 17, 32, 1], 1, 3, 24, 8, 16, 2, ()),
    "causal-chunk": ([70, 4], 4, 3, 32, 8, 16, 2, ()),  # positions 66..69 across a page boundary; a fresh prompt
    "causal-prefill-page64": ([130], 7, 2, 32, 8, 64, 1, ()),
    # 671B's C and R at 16 heads (one GPU head block): lengths 1, 64, 65 and 130 on pages of 64
    "v3-dims-decode": ([1, 64, 65, 130], 1, 16, 512, 64, 64, 2, ()),
    "v3-dims-chunk-shared": ([128, 136], 3, 16, 512, 64, 64, 1, ((0, 1, 2),)),
}


def make_case(name: str, dtype: torch.dtype):
    """(q_latent, q_pe, cache, block_table, seq_lens) with NaN in every entry no row may read."""
    seq_lens, t, h, c, r, page_size, spare, share = CASES[name]
    table, num_pages, used = make_rows(seq_lens, page_size, spare, seed=len(name), share=share)
    b = len(seq_lens)
    q_latent = rand(b, t, h + 2, c, seed=1)[:, :, 1:-1]  # a view: head stride != C
    q_pe = rand(b, t, h, r, seed=2)
    cache = rand(num_pages, page_size, c + r, seed=3)
    cache[~used] = NAN
    wide = torch.full((b, table.shape[1] + 3), -1, dtype=torch.int32)  # a view: row stride != M
    wide[:, : table.shape[1]] = table
    seq = torch.tensor(seq_lens, dtype=torch.int32)
    return q_latent.to(dtype), q_pe.to(dtype), cache.to(dtype), wide[:, : table.shape[1]], seq


TILINGS = {"interpreter-tiles": lambda c, dt: None, "gpu-tiles": lambda c, dt: ops._k().paged.gpu_blocks(c, dt)}


@pytest.mark.parametrize("splits", [1, 3], ids=["one-split", "3-splits"])
@pytest.mark.parametrize("tiling", list(TILINGS))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_paged_attention_matches_cpu_ref(kernel, name, dtype, tiling, splits):
    args = make_case(name, dtype)
    want = ref.mla_paged_attention(*args, SCALE)
    assert torch.isfinite(want).all()
    blocks = TILINGS[tiling](args[0].shape[-1], dtype)
    got = kernel.mla_paged_attention(*args, SCALE, num_splits=splits, blocks=blocks)
    assert torch.isfinite(got).all(), f"{name}: an entry no row may read reached the output"
    assert_close(got, want, TOL[dtype], f"mla_paged_attention {name} {tiling} splits={splits}")


def test_gpu_tiles_are_the_latent_kernels_decode_tiles_halved_for_fp32(kernel):
    assert kernel.gpu_blocks(512, BF16) == (16, 32) and kernel.gpu_blocks(32, BF16) == (16, 64)
    assert kernel.gpu_blocks(512, F32) == (16, 16) and kernel.gpu_blocks(32, F32) == (16, 32)


def test_each_query_sees_only_its_causal_prefix(kernel):
    """Query t of a chunk of T sits at seq_len - T + t: against cpu_ref per query with seq_len cut to its
    position + 1, the later entries NaN. The kernel must give each query exactly that."""
    q_latent, q_pe, cache, table, seq = make_case("causal-chunk", F32)
    got = kernel.mla_paged_attention(q_latent, q_pe, cache, table, seq, SCALE, blocks=(16, 16))
    t = q_latent.shape[1]
    for i in range(t):
        cut = seq - t + i + 1  # query i's own length
        one = cache.clone()
        one[~used_entries(table, cut.tolist(), cache.shape[0], cache.shape[1])] = NAN  # what query i may not see
        want = ref.mla_paged_attention(q_latent[:, i : i + 1], q_pe[:, i : i + 1], one, table, cut, SCALE)
        got_i = kernel.mla_paged_attention(q_latent[:, i : i + 1], q_pe[:, i : i + 1], one, table, cut, SCALE)
        assert_close(got[:, i : i + 1], want, TOL[F32], f"query {i} of the chunk")
        assert_close(got_i, want, TOL[F32], f"query {i} alone")


def test_operator_is_served_by_the_kernel(kernel):
    for target in (NVIDIA, AMD):
        fn = ops.build_mla_paged_attention(OpRequest(dtype=BF16), target)
        assert fn is ops.mla_paged_attention
    args = make_case("decode-shared-pages", BF16)
    assert_close(fn(*args, SCALE), ref.mla_paged_attention(*args, SCALE), TOL[BF16], "ops.mla_paged_attention")


# ----------------------------------------------------------------------------- cache write
def write_case(num_pages: int, page_size: int, c: int, r: int, n: int, seed: int, dtype, src_dtype=None):
    """(cache with a NaN page, kv, pe, slot_mapping with -1 padding first, inside and last)."""
    cache = rand(num_pages, page_size, c + r, seed=seed)
    cache[num_pages - 1] = NAN  # a freed page's stale entries: those not written must stay NaN
    slots = torch.randperm((num_pages - 1) * page_size, generator=gen(seed + 1))[:n]
    slots[n // 3 :] = slots[n // 3 :].flip(0)  # not in order
    slots = torch.cat(
        [torch.tensor([-1]), slots[: n // 2], torch.tensor([-1, -5]), slots[n // 2 :], torch.tensor([-1])]
    )
    src = src_dtype or dtype
    kv = rand(len(slots), c, seed=seed + 2, dtype=src)
    pe = rand(len(slots), r, seed=seed + 3, dtype=src)
    kv[slots < 0], pe[slots < 0] = NAN, NAN  # a padding token's values go nowhere
    return cache.to(dtype), kv, pe, slots


@pytest.mark.parametrize("block_n", [None, "gpu"], ids=["interpreter-block", "gpu-block"])
@pytest.mark.parametrize("dtype,src", [(F32, F32), (BF16, BF16), (BF16, F32)], ids=["fp32", "bf16", "fp32-into-bf16"])
@pytest.mark.parametrize(
    "num_pages,page_size,c,r,n",
    [(9, 16, 32, 8, 60), (6, 64, 512, 64, 150), (3, 16, 4, 2, 1)],
    ids=["page16", "page64-v3-dims", "one-token"],
)
def test_cache_write_is_bit_exact_against_cpu_ref(kernel, num_pages, page_size, c, r, n, dtype, src, block_n):
    cache, kv, pe, slots = write_case(num_pages, page_size, c, r, n, seed=n, dtype=dtype, src_dtype=src)
    if src == F32 and dtype == BF16:
        kv[0, :4] = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 1 + 2**-8 + 2**-20])  # ties and past them
    want = cache.clone()
    ref.paged_cache_write(want, kv, pe, slots)
    inputs = (kv.clone(), pe.clone(), slots.clone())
    block = kernel.gpu_write_block(len(slots), c, r) if block_n == "gpu" else None
    kernel.paged_cache_write(cache, kv, pe, slots, block_n=block)
    assert torch.equal(bits(cache), bits(want))
    assert torch.isnan(cache[-1]).all()  # the freed page: no write landed there
    for before, after in zip(inputs, (kv, pe, slots), strict=True):
        assert torch.equal(bits(before) if before.is_floating_point() else before,
                           bits(after) if after.is_floating_point() else after)  # fmt: skip


def test_cache_write_then_attention_reads_what_was_written(kernel):
    """The two kernels together, as a decode step uses them: write a row's entries by slot into a NaN
    cache, then attend through the block table; cpu_ref does the same with its own two operators."""
    seq_lens, page_size, c, r, h = [33, 64, 2], 16, 32, 8, 4
    table, num_pages, _ = make_rows(seq_lens, page_size, 2, seed=9)
    slots = torch.cat([table[b, torch.arange(n) // page_size].long() * page_size + torch.arange(n) % page_size
                       for b, n in enumerate(seq_lens)])  # fmt: skip
    kv, pe = rand(len(slots), c, seed=10), rand(len(slots), r, seed=11)
    mine, theirs = (torch.full((num_pages, page_size, c + r), NAN) for _ in range(2))
    kernel.paged_cache_write(mine, kv, pe, slots)
    ref.paged_cache_write(theirs, kv, pe, slots)
    assert torch.equal(bits(mine), bits(theirs))
    ql, qp, seq = rand(3, 1, h, c, seed=12), rand(3, 1, h, r, seed=13), torch.tensor(seq_lens, dtype=torch.int32)
    got = kernel.mla_paged_attention(ql, qp, mine, table, seq, SCALE, blocks=kernel.gpu_blocks(c, F32))
    assert_close(got, ref.mla_paged_attention(ql, qp, theirs, table, seq, SCALE), TOL[F32], "write then attend")


def test_write_operator_is_served_by_the_kernel(kernel):
    for target in (NVIDIA, AMD):
        assert ops.build_paged_cache_write(OpRequest(dtype=F32), target) is ops.paged_cache_write
    cache, kv, pe, slots = write_case(5, 16, 16, 4, 20, seed=4, dtype=F32)
    want = cache.clone()
    ref.paged_cache_write(want, kv, pe, slots)
    assert ops.paged_cache_write(cache, kv, pe, slots.to(torch.int32)) is None
    assert torch.equal(bits(cache), bits(want))


# ----------------------------------------------------------------------------- argument checks
def test_wrappers_reject_bad_arguments_with_one_clear_line(kernel):
    ql, qp, cache, table, seq = make_case("decode-random-pages", F32)
    kv, pe, slots = rand(3, 32), rand(3, 8), torch.tensor([0, -1, 5])
    attention_cases = [
        ((ql, qp.to(BF16), cache, table, seq), "q_pe must have dtype in (float32), got bfloat16"),
        ((ql, qp, cache[..., :-1], table, seq), "cache must have shape ["),
        ((ql, qp, cache, table.float(), seq), "block_table must have dtype in (int64, int32), got float32"),
        ((ql, qp, cache, table[:2], seq), "block_table must have shape [3, '*'], got [2, 4]"),
        ((ql, qp, cache, table, seq[:2]), "seq_lens must have shape [3], got [2]"),
        ((ql, qp, cache.to("meta"), table, seq), "tensors on different devices"),
    ]
    for args, message in attention_cases:
        with pytest.raises(KernelArgumentError) as info:
            kernel.mla_paged_attention(*args, SCALE)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert str(info.value).startswith("mla_paged_attention: ")
    with pytest.raises(KernelArgumentError, match="blocks must be two powers of two >= 16, got \\(8, 16\\)"):
        kernel.mla_paged_attention(ql, qp, cache, table, seq, SCALE, blocks=(8, 16))
    c3 = torch.zeros(4, 16, 40)
    write_cases = [
        ((c3, kv, pe[:, :3], slots), "pe must have shape [3, 8], got [3, 3]"),
        ((c3, kv, pe, slots.float()), "slot_mapping must have dtype in (int64, int32), got float32"),
        ((c3, kv, pe, slots[:2]), "slot_mapping must have shape [3], got [2]"),
        ((c3[..., ::2], kv[:, :16], pe[:, :4], slots), "cache must have unit stride along its last dim"),
        ((c3[..., :30], kv, pe, slots), "cache entries hold 30 values, not more than kv's C = 32"),
    ]
    for args, message in write_cases:
        with pytest.raises(KernelArgumentError) as info:
            kernel.paged_cache_write(*args)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
        assert str(info.value).startswith("paged_cache_write: ")


# ----------------------------------------------------------------------------- the FP8 latent cache
FP8S = [torch.float8_e4m3fn, torch.float8_e4m3fnuz]  # nvidia's, and amd MI300's


def fp8_write_case(num_pages, page_size, c, r, n, seed, dtype, fp8):
    """Garbage bytes in an fp8 cache, n tokens of mixed magnitudes (a zero tile, a NaN, an infinity, 17s)."""
    from dsv3.model import fp8_cache

    w = fp8_cache.entry_bytes(c, r, dtype)
    cache = torch.randint(0, 256, (num_pages, page_size, w), generator=gen(seed), dtype=torch.uint8).view(fp8)
    slots = torch.randperm(num_pages * page_size, generator=gen(seed + 1))[:n]
    slots[::5] = -1
    kv = rand(n, c, seed=seed + 2) * torch.logspace(-4, 3, n).unsqueeze(1)  # 1e-4 .. 1e3 per token
    kv[0, : min(c, 128)] = 0.0
    if n > 3:
        kv[1, 2], kv[2, c - 1], kv[3, :5] = NAN, float("inf"), 17.0  # 17: the interpreter's cast gives 18
    return cache, kv.to(dtype), rand(n, r, seed=seed + 3, dtype=dtype), slots


@pytest.mark.parametrize("fp8", FP8S, ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_pages,page_size,c,r,n", [(5, 16, 200, 8, 40), (4, 64, 512, 64, 70), (2, 2, 4, 2, 1)])
def test_fp8_cache_write_is_bit_exact_against_cpu_ref(kernel, num_pages, page_size, c, r, n, dtype, fp8):
    cache, kv, pe, slots = fp8_write_case(num_pages, page_size, c, r, n, n, dtype, fp8)
    want = cache.clone()
    ref.paged_cache_write(want, kv, pe, slots)
    kernel.paged_cache_write(cache, kv, pe, slots, block_n=4 if n > 4 else None)
    assert torch.equal(cache.view(torch.uint8), want.view(torch.uint8))  # values, scales, roped keys, untouched bytes


@pytest.mark.parametrize("fp8", FP8S, ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("splits", [1, 3])
def test_fp8_cache_attention_matches_cpu_ref_and_skips_garbage(kernel, dtype, fp8, splits):
    from dsv3.model import fp8_cache

    c, r, h, page_size = 256, 16, 4, 4
    table, num_pages, used = make_rows([5, 12, 7], page_size, 2, seed=11, share=((0, 2, 1),))
    entries = fp8_cache.encode_entries(rand(num_pages * page_size, c, seed=12, dtype=dtype),
                                       rand(num_pages * page_size, r, seed=13, dtype=dtype), fp8)  # fmt: skip
    cache = entries.view(num_pages, page_size, -1)
    cache.view(torch.uint8)[~used] = 0xFF  # stale entries: NaN values, scales and roped keys
    seq = torch.tensor([5, 12, 7], dtype=torch.int32)
    ql, qp = rand(3, 2, h, c, seed=14, dtype=dtype), rand(3, 2, h, r, seed=15, dtype=dtype)
    want = ref.mla_paged_attention(ql, qp, cache, table, seq, SCALE)
    got = kernel.mla_paged_attention(ql, qp, cache, table, seq, SCALE, num_splits=splits, blocks=(16, 16))
    assert not got.isnan().any()
    # both dequantize the same bytes exactly (fp8 x scale, rounded to the compute dtype): the compute dtype's tolerance
    assert_close(got, want, TOL[dtype], f"fp8 cache {fp8} splits={splits}")


def test_fp8_cache_wrappers_reject_a_wrong_entry_width(kernel):
    cache = torch.zeros((2, 4, 100), dtype=torch.float8_e4m3fn)  # C 64, R 16 in bf16 is 100 bytes, not in fp32
    kv, pe = torch.zeros(1, 64), torch.zeros(1, 16)
    with pytest.raises(KernelArgumentError, match="cache"):
        kernel.paged_cache_write(cache, kv, pe, torch.zeros(1, dtype=torch.int64))
    with pytest.raises(KernelArgumentError, match="cache"):
        kernel.mla_paged_attention(torch.zeros(1, 1, 2, 64), torch.zeros(1, 1, 2, 16), cache,
                                   torch.zeros(1, 1, dtype=torch.int32), torch.ones(1, dtype=torch.int32), SCALE)  # fmt: skip
