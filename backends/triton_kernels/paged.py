"""The paged latent cache: the ``paged_cache_write`` and ``mla_paged_attention`` operators.

A layer's cache is ``(P, page_size, C + R)``: each entry holds a token's latent (first C values)
and roped key (last R values). Entry j of batch row b lives at ``cache[block_table[b, j //
page_size], j % page_size]``.

The write kernel takes BLOCK_N tokens per program and stores each at its slot; a negative slot is
a padding token and stores nothing.

The attention kernel is ``mla``'s (weight-absorbed MLA, BLOCK_H heads of one query row per
program, online softmax in float32, split-KV merged by log-sum-exp) with one change: a key tile
of BLOCK_S positions finds each position's page through the block table, so any page size works
(a tile may span several pages, or lie inside one). Only positions below the query's own bound
(``seq_lens[b] - T + t + 1``) are loaded: the block-table entries past a row's pages, the rest of
its last page and pages it does not list are never touched, and masked lanes load 0, never a
stale value. Each split of a row takes an equal share of that row's own keys, so the host needs no
row lengths (no device-to-host copy).

The FP8 cache (a cache of an fp8 dtype, ``(P, page_size, W)`` bytes per entry in the layout of
``dsv3.model.fp8_cache``): the write kernel quantizes each token's latent per 128-value tile (amax,
scale, round to nearest even on the fp8 grid by hand, so the bits match cpu_ref's torch cast on a GPU
and in the interpreter) and stores the roped key as is; the attention kernel loads the fp8 values and
their tile's scale and dequantizes in registers (``fp8 * scale`` in float32, rounded to the compute
dtype), the rest unchanged. The scales and the roped key are read through float32 and compute-dtype
views of the same storage (byte offsets in the layout are multiples of 4).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.model import fp8_cache
from dsv3.weights import AMAX_FLOOR, FP8_DTYPES, FP8_MAX

from .jit_utils import TL_DTYPE, online_softmax_tile, round_to, round_to_fp8_grid, row_max
from .runtime import (
    FP8_EMIN,
    HP_DTYPES,
    cdiv,
    check_device,
    check_tensor,
    interpreting,
    launch_opts,
    next_pow2,
    require,
    sm_count,
)

_LOG2E = 1.4426950408889634
_INDEX_DTYPES = (torch.int64, torch.int32)
_TL_FP8 = {torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e4m3fnuz: tl.float8e4b8}
#: The byte torch's cast gives a NaN (positive): e4m3fn 0x7F, e4m3fnuz's only NaN 0x80.
_NAN_BITS = {dt: int(torch.tensor(float("nan")).to(dt).view(torch.uint8)) for dt in _TL_FP8}


# ----------------------------------------------------------------------------- cache write
@triton.jit(do_not_specialize=["N"])  # the token count changes every call
def _cache_write_kernel(
    cache_ptr, kv_ptr, pe_ptr, slot_ptr,
    N, C, R, s_cp, s_co, s_kvn, s_pen, s_sn,
    PAGE_SIZE: tl.constexpr, SRC: tl.constexpr, DST: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows < N
    r64 = rows.to(tl.int64)
    slot = tl.load(slot_ptr + r64 * s_sn, mask=n_ok, other=-1).to(tl.int64)
    ok = n_ok & (slot >= 0)
    slot = tl.where(ok, slot, 0)
    dst = (slot // PAGE_SIZE) * s_cp + (slot % PAGE_SIZE) * s_co  # (BLOCK_N,) entry offsets
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    mask_c = ok[:, None] & (offs_c < C)[None, :]
    mask_r = ok[:, None] & (offs_r < R)[None, :]
    kv = tl.load(kv_ptr + r64[:, None] * s_kvn + offs_c[None, :], mask=mask_c, other=0.0)
    pe = tl.load(pe_ptr + r64[:, None] * s_pen + offs_r[None, :], mask=mask_r, other=0.0)
    if SRC != DST:  # rounded to nearest even by hand: the interpreter's float32 -> bfloat16 cast truncates
        kv = round_to(kv.to(tl.float32), DST)
        pe = round_to(pe.to(tl.float32), DST)
    tl.store(cache_ptr + dst[:, None] + offs_c[None, :], kv, mask=mask_c)
    tl.store(cache_ptr + dst[:, None] + C + offs_r[None, :], pe, mask=mask_r)


@triton.jit(do_not_specialize=["N"])
def _cache_write_fp8_kernel(
    cache_ptr, scale_ptr, rope_ptr, kv_ptr, pe_ptr, slot_ptr,
    N, C, R, G, s_cp, s_co, s_kvn, s_pen, s_sn,
    PAGE_SIZE: tl.constexpr, ISZ: tl.constexpr, FP8_TY: tl.constexpr, NAN_BITS: tl.constexpr,
    FP8_MAX_V: tl.constexpr, EMIN: tl.constexpr, AMAX_MIN: tl.constexpr, TILE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rows < N
    r64 = rows.to(tl.int64)
    slot = tl.load(slot_ptr + r64 * s_sn, mask=n_ok, other=-1).to(tl.int64)
    ok = n_ok & (slot >= 0)
    slot = tl.where(ok, slot, 0)
    dst = (slot // PAGE_SIZE) * s_cp + (slot % PAGE_SIZE) * s_co  # (BLOCK_N,) entry offsets in bytes
    for g in range(0, G):
        col = g * TILE + tl.arange(0, TILE)
        mask = ok[:, None] & (col < C)[None, :]
        x = tl.load(kv_ptr + r64[:, None] * s_kvn + col[None, :], mask=mask, other=0.0).to(tl.float32)
        # NaN / inf anywhere in the tile: a NaN scale and NaN values (a GPU's max drops NaN, so say it here)
        odd = tl.where((x != x) | (tl.abs(x) == float("inf")), 1.0, 0.0)
        bad = row_max(odd, 1) > 0.0  # (BLOCK_N,)
        amax = tl.maximum(row_max(tl.abs(x), 1), AMAX_MIN)
        sc = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX_V, tl.float32))
        sc = tl.where(bad, float("nan"), sc)
        y = tl.math.div_rn(x, tl.broadcast_to(sc[:, None], x.shape))
        y = tl.minimum(tl.maximum(y, -FP8_MAX_V), FP8_MAX_V)
        q = round_to_fp8_grid(y, EMIN).to(FP8_TY).to(tl.uint8, bitcast=True)
        q = tl.where(bad[:, None], NAN_BITS, q)  # torch's NaN byte (the interpreter's NaN -> fp8 cast gives 384)
        tl.store(cache_ptr + dst[:, None] + col[None, :], q, mask=mask)
        tl.store(scale_ptr + (dst + C) // 4 + g, sc, mask=ok)
    offs_r = tl.arange(0, BLOCK_R)
    mask_r = ok[:, None] & (offs_r < R)[None, :]
    pe = tl.load(pe_ptr + r64[:, None] * s_pen + offs_r[None, :], mask=mask_r, other=0.0)
    tl.store(rope_ptr + ((dst + C + 4 * G) // ISZ)[:, None] + offs_r[None, :], pe, mask=mask_r)


def gpu_write_block(n: int, c: int, r: int) -> int:
    """Tokens per program a GPU launch of the write kernel uses: a power of two, about 4K values a program."""
    per_program = max(1, 4096 // (next_pow2(c) + next_pow2(r)))
    return min(next_pow2(n), 1 << (per_program.bit_length() - 1))


def paged_cache_write(
    cache: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, slot_mapping: torch.Tensor, block_n: int | None = None
) -> None:
    """cache (P, page_size, C + R) in place <- concat(kv (N, C), pe (N, R)) cast to cache.dtype at
    slot_mapping (N,) int64/int32; a negative slot is skipped. The cache needs unit stride along its
    last dim (it is written in place); kv and pe are copied if they lack it.
    block_n: tokens per program instead of the default (for tests)."""
    where = "paged_cache_write"
    check_tensor(where, "cache", cache, HP_DTYPES + FP8_DTYPES, ndim=3)
    check_tensor(where, "kv", kv, HP_DTYPES, ndim=2)
    n, c = kv.shape
    if cache.dtype in FP8_DTYPES:
        return _write_fp8(cache, kv, pe, slot_mapping, block_n)
    r = cache.shape[-1] - c
    require(r >= 1, where, f"cache entries hold {cache.shape[-1]} values, not more than kv's C = {c}")
    check_tensor(where, "pe", pe, (kv.dtype,), shape=(n, r))
    check_tensor(where, "slot_mapping", slot_mapping, _INDEX_DTYPES, shape=(n,))
    require(cache.stride(-1) == 1, where, "cache must have unit stride along its last dim (it is written in place)")
    check_device(where, cache=cache, kv=kv, pe=pe, slot_mapping=slot_mapping)
    if n == 0 or cache.numel() == 0:
        return
    kv, pe = (x if x.stride(-1) == 1 else x.contiguous() for x in (kv, pe))
    block_c, block_r = next_pow2(c), next_pow2(r)
    if block_n is None:  # the interpreter pays per program: few, large ones there
        block_n = min(128, next_pow2(n)) if interpreting() else gpu_write_block(n, c, r)
    require(block_n >= 1 and block_n == next_pow2(block_n), where, f"block_n must be a power of two, got {block_n}")
    _cache_write_kernel[(cdiv(n, block_n),)](
        cache, kv, pe, slot_mapping, n, c, r, cache.stride(0), cache.stride(1), kv.stride(0), pe.stride(0),
        slot_mapping.stride(0), PAGE_SIZE=cache.shape[1], SRC=TL_DTYPE[kv.dtype], DST=TL_DTYPE[cache.dtype],
        BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_R=block_r,
    )  # fmt: skip


def _check_fp8_cache(where: str, cache: torch.Tensor, c: int, r: int, dtype: torch.dtype) -> None:
    """An fp8 cache (P, page_size, W) for latent C, roped key R in ``dtype``, whose entries start at multiples of 4 bytes."""
    require(c % 4 == 0, where, f"the fp8 latent cache needs C a multiple of 4, got {c}")
    width = fp8_cache.entry_bytes(c, r, dtype)
    check_tensor(where, "cache", cache, FP8_DTYPES, shape=(None, None, width))
    require(
        cache.stride(-1) == 1 and cache.stride(0) % 4 == 0 and cache.stride(1) % 4 == 0,
        where,
        "an fp8 cache must have unit stride along its last dim and entries aligned to 4 bytes",
    )


def _write_fp8(cache, kv, pe, slot_mapping, block_n: int | None) -> None:
    """paged_cache_write into an fp8 cache (P, page_size, W): kv (N, C) quantized per 128-value tile, pe (N, R) as is."""
    where = "paged_cache_write"
    n, c = kv.shape
    check_tensor(where, "pe", pe, (kv.dtype,), ndim=2)
    check_tensor(where, "pe", pe, (kv.dtype,), shape=(n, None))
    r = pe.shape[1]
    _check_fp8_cache(where, cache, c, r, kv.dtype)
    check_tensor(where, "slot_mapping", slot_mapping, _INDEX_DTYPES, shape=(n,))
    check_device(where, cache=cache, kv=kv, pe=pe, slot_mapping=slot_mapping)
    if n == 0 or cache.numel() == 0:
        return
    kv, pe = (x if x.stride(-1) == 1 else x.contiguous() for x in (kv, pe))
    if block_n is None:
        block_n = min(128, next_pow2(n)) if interpreting() else min(next_pow2(n), 16)
    require(block_n >= 1 and block_n == next_pow2(block_n), where, f"block_n must be a power of two, got {block_n}")
    raw = cache.view(torch.uint8)
    _cache_write_fp8_kernel[(cdiv(n, block_n),)](
        raw, raw.view(torch.float32), raw.view(kv.dtype), kv, pe, slot_mapping,
        n, c, r, fp8_cache.num_tiles(c), cache.stride(0), cache.stride(1), kv.stride(0), pe.stride(0),
        slot_mapping.stride(0), PAGE_SIZE=cache.shape[1], ISZ=kv.element_size(), FP8_TY=_TL_FP8[cache.dtype],
        NAN_BITS=_NAN_BITS[cache.dtype], FP8_MAX_V=FP8_MAX[cache.dtype],
        EMIN=FP8_EMIN[cache.dtype], AMAX_MIN=AMAX_FLOOR, TILE=fp8_cache.TILE, BLOCK_N=block_n,
        BLOCK_R=next_pow2(r),
    )  # fmt: skip


# ----------------------------------------------------------------------------- attention
@triton.jit(do_not_specialize=["T"])
def _paged_mla_kernel(
    ql_ptr, qp_ptr, cache_ptr, scale_ptr, rope_ptr, bt_ptr, len_ptr, o_ptr, lse_ptr,
    T, H, C, R, G, num_splits, qk_scale,
    s_qlb, s_qlt, s_qlh, s_qpb, s_qpt, s_qph, s_cp, s_co, s_btb, s_btm, s_len,
    s_os, s_ob, s_ot, s_oh, s_ls, s_lb, s_lt,
    PAGE_SIZE: tl.constexpr, CDT: tl.constexpr, OUT: tl.constexpr, HP_IEEE: tl.constexpr,
    WRITE_LSE: tl.constexpr, FP8: tl.constexpr, ISZ: tl.constexpr, TILE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    b = (row // T).to(tl.int64)
    t = row % T
    hb = tl.program_id(1)
    split = tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < C
    r_ok = offs_r < R

    # query t of row b sits at position seq_len - T + t and sees keys 0..that position
    n_keys = tl.load(len_ptr + b * s_len).to(tl.int32) - T + t + 1
    per_split = (n_keys + num_splits - 1) // num_splits
    per_split = (per_split + BLOCK_S - 1) // BLOCK_S * BLOCK_S
    lo = split * per_split
    hi = tl.minimum(lo + per_split, n_keys)

    q = tl.load(
        ql_ptr + b * s_qlb + t * s_qlt + heads[:, None] * s_qlh + offs_c[None, :],
        mask=h_ok[:, None] & c_ok[None, :],
        other=0.0,
    )
    qp = tl.load(
        qp_ptr + b * s_qpb + t * s_qpt + heads[:, None] * s_qph + offs_r[None, :],
        mask=h_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    if HP_IEEE:
        q = q.to(tl.float32)
        qp = qp.to(tl.float32)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_H,), 0, tl.float32)
    acc = tl.full((BLOCK_H, BLOCK_C), 0, tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        keys = s0 + tl.arange(0, BLOCK_S)
        k_ok = keys < hi  # the block table is read only for the row's own positions
        page = tl.load(bt_ptr + b * s_btb + (keys // PAGE_SIZE).to(tl.int64) * s_btm, mask=k_ok, other=0)
        entry = page.to(tl.int64) * s_cp + (keys % PAGE_SIZE).to(tl.int64) * s_co  # (BLOCK_S,)
        kc_ok = k_ok[:, None] & c_ok[None, :]
        kr_ok = k_ok[:, None] & r_ok[None, :]
        if FP8:  # entry = byte offset; latent fp8 * its tile's scale, rounded to the compute dtype as cpu_ref does
            q8 = tl.load(cache_ptr + entry[:, None] + offs_c[None, :], mask=kc_ok, other=0.0).to(tl.float32)
            sc = tl.load(scale_ptr + ((entry + C) // 4)[:, None] + (offs_c // TILE)[None, :], mask=kc_ok, other=0.0)
            kv = round_to(q8 * sc, CDT)
            pe = tl.load(rope_ptr + ((entry + C + 4 * G) // ISZ)[:, None] + offs_r[None, :], mask=kr_ok, other=0.0)
        else:
            kv = tl.load(cache_ptr + entry[:, None] + offs_c[None, :], mask=kc_ok, other=0.0)
            pe = tl.load(cache_ptr + entry[:, None] + C + offs_r[None, :], mask=kr_ok, other=0.0)
        if HP_IEEE:
            kv = kv.to(tl.float32)
            pe = pe.to(tl.float32)
            scores = tl.dot(q, tl.trans(kv), input_precision="ieee") + tl.dot(qp, tl.trans(pe), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(kv)) + tl.dot(qp, tl.trans(pe))
        scores = tl.where(k_ok[None, :], scores * qk_scale, float("-inf"))  # (BLOCK_H, BLOCK_S), log2 units
        m_i, l_i, acc = online_softmax_tile(scores, kv, m_i, l_i, acc, CDT, HP_IEEE)

    o_off = split * s_os + b * s_ob + t * s_ot + heads[:, None] * s_oh + offs_c[None, :]
    o = acc / tl.maximum(l_i, 1e-30)[:, None]  # a split with no key has acc = 0, l = 0
    tl.store(o_ptr + o_off, round_to(o, OUT), mask=h_ok[:, None] & c_ok[None, :])
    if WRITE_LSE:  # log2-sum-exp of the split, for merging splits
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(lse_ptr + split * s_ls + b * s_lb + t * s_lt + heads, lse, mask=h_ok)


def gpu_blocks(c: int, dtype: torch.dtype) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_S) a GPU launch uses for latent width ``c`` in ``dtype``: ``mla``'s decode tiles,
    with half the keys for float32 (at C = 512 a 32-key float32 tile needs 74 KiB of shared memory,
    more than an MI300's 64 KiB of LDS; 16 keys fit)."""
    block_s = 32 if max(16, next_pow2(c)) >= 256 else 64
    return 16, block_s // 2 if dtype.itemsize == 4 else block_s


def mla_paged_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """q_latent (B, T, H, C), q_pe (B, T, H, R), cache (P, page_size, C + R), block_table (B, M) int32,
    seq_lens (B,) int32 -> (B, T, H, C) q_latent.dtype.

    ``mla_latent_attention`` over row b's first ``seq_lens[b]`` cache positions, query t at position
    ``seq_lens[b] - T + t`` (requires ``T <= seq_lens[b]``, not checked: that would copy to the host).
    num_splits: key slices per query row (None: enough to fill the GPU; 1 under the interpreter).
    blocks: (BLOCK_H, BLOCK_S), powers of two >= 16, instead of the default tiling (for tests).
    """
    where = "mla_paged_attention"
    check_tensor(where, "q_latent", q_latent, HP_DTYPES, ndim=4)
    bsz, t, h, c = q_latent.shape
    check_tensor(where, "q_pe", q_pe, (q_latent.dtype,), ndim=4)
    r = q_pe.shape[-1]
    check_tensor(where, "q_pe", q_pe, (q_latent.dtype,), shape=(bsz, t, h, r))
    check_tensor(where, "cache", cache, (q_latent.dtype,) + FP8_DTYPES, ndim=3)
    num_pages, page_size = cache.shape[:2]
    fp8 = cache.dtype in FP8_DTYPES
    if fp8:
        _check_fp8_cache(where, cache, c, r, q_latent.dtype)
    else:
        check_tensor(where, "cache", cache, (q_latent.dtype,), shape=(num_pages, page_size, c + r))
    check_tensor(where, "block_table", block_table, _INDEX_DTYPES, ndim=2)
    check_tensor(where, "block_table", block_table, _INDEX_DTYPES, shape=(bsz, None))
    check_tensor(where, "seq_lens", seq_lens, _INDEX_DTYPES, shape=(bsz,))
    require(page_size >= 1 and num_pages >= 1, where, f"the cache has no entries (shape {list(cache.shape)})")
    check_device(where, q_latent=q_latent, q_pe=q_pe, cache=cache, block_table=block_table, seq_lens=seq_lens)
    ql, qp = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_latent, q_pe))
    cache = cache if cache.stride(-1) == 1 else cache.contiguous()
    raw = cache.view(torch.uint8) if fp8 else None
    scale_view, rope_view = (raw.view(torch.float32), raw.view(q_latent.dtype)) if fp8 else (cache, cache)
    out = torch.empty((bsz, t, h, c), dtype=q_latent.dtype, device=q_latent.device)
    if out.numel() == 0:
        return out
    interp = interpreting()
    max_keys = block_table.shape[1] * page_size  # an upper bound of every row's length
    block_c, block_r = max(16, next_pow2(c)), max(16, next_pow2(r))
    if interp:  # few, large programs: the interpreter pays per program and per operation
        block_h, block_s = min(128, max(16, next_pow2(h))), min(256, max(16, next_pow2(max_keys)))
    else:
        block_h, block_s = gpu_blocks(c, q_latent.dtype)
    if blocks is not None:
        require(
            len(blocks) == 2 and all(isinstance(n, int) and n >= 16 and n == next_pow2(n) for n in blocks),
            where,
            f"blocks must be two powers of two >= 16, got {blocks}",
        )
        block_h, block_s = blocks
    h_blocks = cdiv(h, block_h)
    if num_splits is None:
        num_splits = 1
        if not interp:
            rows = bsz * t * h_blocks
            num_splits = max(1, min(cdiv(2 * sm_count(q_latent.device.index or 0), rows), cdiv(max_keys, 256)))
    require(isinstance(num_splits, int) and num_splits >= 1, where, f"num_splits must be >= 1, got {num_splits}")
    cdt = TL_DTYPE[q_latent.dtype]
    common = dict(PAGE_SIZE=page_size, CDT=cdt, HP_IEEE=interp or q_latent.dtype == torch.float32,
                  BLOCK_H=block_h, BLOCK_S=block_s, BLOCK_C=block_c, BLOCK_R=block_r,
                  FP8=fp8, ISZ=q_latent.element_size(), TILE=fp8_cache.TILE,
                  **launch_opts(4 if block_c <= 128 else 8, 2))  # fmt: skip
    grid = (bsz * t, h_blocks, num_splits)
    qk_scale = float(scale) * _LOG2E
    args = (ql, qp, cache, scale_view, rope_view, block_table, seq_lens)
    sizes = (t, h, c, r, fp8_cache.num_tiles(c), num_splits, qk_scale)
    strides = (ql.stride(0), ql.stride(1), ql.stride(2), qp.stride(0), qp.stride(1), qp.stride(2),
               cache.stride(0), cache.stride(1), block_table.stride(0), block_table.stride(1), seq_lens.stride(0))  # fmt: skip
    if num_splits == 1:
        _paged_mla_kernel[grid](
            *args, out, out, *sizes, *strides, 0, out.stride(0), out.stride(1), out.stride(2), 0, 0, 0,
            OUT=cdt, WRITE_LSE=False, **common,
        )  # fmt: skip
        return out
    part = torch.empty((num_splits, bsz, t, h, c), dtype=torch.float32, device=out.device)
    lse = torch.empty((num_splits, bsz, t, h), dtype=torch.float32, device=out.device)
    _paged_mla_kernel[grid](
        *args, part, lse, *sizes, *strides,
        part.stride(0), part.stride(1), part.stride(2), part.stride(3), lse.stride(0), lse.stride(1), lse.stride(2),
        OUT=tl.float32, WRITE_LSE=True, **common,
    )  # fmt: skip
    # merge the splits: each holds its own softmax average; weight them by their share of the mass
    w = torch.exp2(lse - lse.amax(0, keepdim=True))  # (splits, B, T, H); split 0 holds key 0 of every row
    w = w / w.sum(0, keepdim=True)
    return (part * w.unsqueeze(-1)).sum(0).to(out.dtype)
