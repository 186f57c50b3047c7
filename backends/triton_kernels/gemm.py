"""One GEMM kernel for every weight format, dense or grouped by expert, with fp32 accumulation.

``C[m, n] = sum_k A[m, k] * B[n, k]`` where B is a weight ``(N, K)`` (or a stack ``(E, N, K)``).

A kinds: ``A_HP`` (compute dtype), ``A_FP8`` (fp8, one fp32 scale per row per 128 columns),
``A_INT8`` (int8, one fp32 scale per row). B kinds: ``B_HP``, ``B_FP8`` (fp8, 128 x 128 block
scales), ``B_INT8`` (int8, one scale per output channel).

- FP8 x FP8: each 128-wide K block's product is taken by ``tl.dot`` on fp8 and promoted to the fp32
  accumulator times ``sa[m, kb] * sb[n // 128, kb]`` (as DeepGEMM promotes).
- INT8 x INT8: exact int32 accumulation, scaled by ``sa[m] * sb[n]`` at the end.
- HP x quantized (``act_quant == "none"``): the weight tile is dequantized in registers to the
  compute dtype (the same rounding as cpu_ref's ``dequantize``) and multiplied in it.

Row modes serve routed experts without a Python loop over experts: ``ROWS_GATHER`` reads A row
``rows[m] // topk`` and ``ROWS_SCATTER`` writes C row ``rows[m]`` scaled by ``row_weight[rows[m]]``;
with ``GROUPED`` every BLOCK_M rows share the expert ``block_expert[m // BLOCK_M]`` (-1: no work).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from dsv3.weights import FP8_DTYPES

from .jit_utils import TL_DTYPE, round_to
from .runtime import (
    HP_DTYPES,
    MAX_BLOCK_NUMEL,
    QBLOCK,
    cdiv,
    check_device,
    check_tensor,
    emulated_gpu,
    interpreting,
    last_dim_contiguous,
    launch_opts,
    next_pow2,
    require,
    sm_count,
    tiles_for_hip,
)

A_HP, A_FP8, A_INT8 = 0, 1, 2
B_HP, B_FP8, B_INT8 = 0, 1, 2
ROWS_PLAIN, ROWS_GATHER, ROWS_SCATTER = 0, 1, 2


@triton.jit(do_not_specialize=["M", "TOPK", "k_tiles_per_split"])  # token counts vary: one compile
def _gemm_kernel(
    a_ptr, as_ptr, b_ptr, bs_ptr, b2_ptr, bs2_ptr, c_ptr, rows_ptr, expert_ptr, rw_ptr,
    M, N, K, TOPK, k_tiles_per_split,
    stride_am, stride_ak, stride_asm, stride_ask,
    stride_be, stride_bn, stride_bk, stride_bse, stride_bsn, stride_bsk,
    stride_cs, stride_cm, stride_cn,
    A_KIND: tl.constexpr, B_KIND: tl.constexpr, ROWS: tl.constexpr, GROUPED: tl.constexpr,
    DUAL: tl.constexpr, CDT: tl.constexpr, OUT: tl.constexpr, HP_IEEE: tl.constexpr, QB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    if A_KIND == 1 or B_KIND == 1:
        tl.static_assert(BLOCK_K == QB, "fp8 block scales need BLOCK_K == 128")
    # tile order: GROUP_M row tiles share each column sweep (L2 reuse of B)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = (M + BLOCK_M - 1) // BLOCK_M  # not tl.cdiv: see jit_utils
    num_pid_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_pid_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N
    ridx = offs_m
    if ROWS != 0:
        ridx = tl.load(rows_ptr + offs_m, mask=m_ok, other=-1)
        m_ok = m_ok & (ridx >= 0)
        ridx = tl.where(m_ok, ridx, 0)
    if ROWS == 1:
        a_row = (ridx // TOPK).to(tl.int64)
    else:
        a_row = offs_m.to(tl.int64)
    n64 = offs_n.to(tl.int64)

    k_lo = split * k_tiles_per_split
    k_hi = tl.minimum(k_lo + k_tiles_per_split, (K + BLOCK_K - 1) // BLOCK_K)
    if GROUPED:
        e = tl.load(expert_ptr + pid_m)
        if e < 0:  # a block past the last expert's rows: nothing to do
            return
        e64 = e.to(tl.int64)
        b_ptr += e64 * stride_be
        bs_ptr += e64 * stride_bse
        if DUAL:
            b2_ptr += e64 * stride_be
            bs2_ptr += e64 * stride_bse

    if A_KIND == 2:
        acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
        if DUAL:
            acc2 = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)
    else:
        acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
        if DUAL:
            acc2 = tl.full((BLOCK_M, BLOCK_N), 0, tl.float32)
    if A_KIND == 0 and B_KIND == 2:
        sb_ch = tl.load(bs_ptr + n64 * stride_bsn, mask=n_ok, other=0.0)
        if DUAL:
            sb2_ch = tl.load(bs2_ptr + n64 * stride_bsn, mask=n_ok, other=0.0)

    for kb in range(k_lo, k_hi):
        offs_k = kb * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a = tl.load(
            a_ptr + a_row[:, None] * stride_am + offs_k[None, :] * stride_ak,
            mask=m_ok[:, None] & k_ok[None, :],
            other=0.0,
        )
        b_off = n64[None, :] * stride_bn + offs_k[:, None] * stride_bk  # (BLOCK_K, BLOCK_N): B transposed
        b_mask = n_ok[None, :] & k_ok[:, None]
        b = tl.load(b_ptr + b_off, mask=b_mask, other=0.0)
        if DUAL:
            b2 = tl.load(b2_ptr + b_off, mask=b_mask, other=0.0)
        if A_KIND == 1:
            sa = tl.load(as_ptr + a_row * stride_asm + kb * stride_ask, mask=m_ok, other=0.0)
            sb = tl.load(bs_ptr + (offs_n // QB) * stride_bsn + kb * stride_bsk, mask=n_ok, other=0.0)
            acc += tl.dot(a, b, out_dtype=tl.float32) * (sa[:, None] * sb[None, :])
            if DUAL:
                sb2 = tl.load(bs2_ptr + (offs_n // QB) * stride_bsn + kb * stride_bsk, mask=n_ok, other=0.0)
                acc2 += tl.dot(a, b2, out_dtype=tl.float32) * (sa[:, None] * sb2[None, :])
        elif A_KIND == 2:
            acc = tl.dot(a, b, acc, out_dtype=tl.int32)
            if DUAL:
                acc2 = tl.dot(a, b2, acc2, out_dtype=tl.int32)
        else:
            if B_KIND == 1:
                sb = tl.load(bs_ptr + (offs_n // QB) * stride_bsn + kb * stride_bsk, mask=n_ok, other=0.0)
                b = round_to(b.to(tl.float32) * sb[None, :], CDT)
                if DUAL:
                    sb2 = tl.load(bs2_ptr + (offs_n // QB) * stride_bsn + kb * stride_bsk, mask=n_ok, other=0.0)
                    b2 = round_to(b2.to(tl.float32) * sb2[None, :], CDT)
            elif B_KIND == 2:
                b = round_to(b.to(tl.float32) * sb_ch[None, :], CDT)
                if DUAL:
                    b2 = round_to(b2.to(tl.float32) * sb2_ch[None, :], CDT)
            if HP_IEEE:
                acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
                if DUAL:
                    acc2 = tl.dot(a.to(tl.float32), b2.to(tl.float32), acc2, input_precision="ieee")
            else:
                acc = tl.dot(a, b, acc)
                if DUAL:
                    acc2 = tl.dot(a, b2, acc2)

    if A_KIND == 2:
        sa = tl.load(as_ptr + a_row * stride_asm, mask=m_ok, other=0.0)
        sb = tl.load(bs_ptr + n64 * stride_bsn, mask=n_ok, other=0.0)
        y = acc.to(tl.float32) * sa[:, None] * sb[None, :]
        if DUAL:
            sb2 = tl.load(bs2_ptr + n64 * stride_bsn, mask=n_ok, other=0.0)
            y2 = acc2.to(tl.float32) * sa[:, None] * sb2[None, :]
    else:
        y = acc
        if DUAL:
            y2 = acc2
    if DUAL:  # silu(gate) * up, rounded to the compute dtype at each step as the unfused ops would
        h1 = round_to(y, CDT).to(tl.float32)
        h3 = round_to(y2, CDT).to(tl.float32)
        e = tl.exp(-tl.abs(h1))  # a sigmoid that never overflows
        g = round_to(h1 * tl.where(h1 >= 0, 1.0 / (1.0 + e), e / (1.0 + e)), CDT).to(tl.float32)
        y = g * h3
    if ROWS == 2:
        w = tl.load(rw_ptr + ridx, mask=m_ok, other=0.0)
        y = round_to(y, CDT).to(tl.float32) * w[:, None]
        c_row = ridx.to(tl.int64)
    else:
        c_row = offs_m.to(tl.int64)
    if ROWS == 1:  # padding rows of an expert's last block are written too (zeros)
        store_ok = offs_m < M
    else:
        store_ok = m_ok
    c_ptrs = c_ptr + split * stride_cs + c_row[:, None] * stride_cm + n64[None, :] * stride_cn
    tl.store(c_ptrs, round_to(y, OUT), mask=store_ok[:, None] & n_ok[None, :])


@dataclass(frozen=True)
class GemmConfig:
    """Tile sizes and launch options of one GEMM launch. ``split_k`` > 1 sums partial products."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1


def pick_config(
    m: int,
    n: int,
    k: int,
    a_kind: int,
    b_kind: int,
    dual: bool = False,
    allow_split: bool = True,
    device=None,
    a_dtype: torch.dtype | None = None,
) -> GemmConfig:
    """A tile shape for the problem: small M (decode) gets thin tiles and split-K to fill the GPU.

    Under the interpreter every program and every operation costs Python time while numpy does
    the arithmetic, so tiles are as large as the problem (up to 64 x 2048 x 1024, each block under
    Triton's element limit) and there is no split; with ``DSV3_TRITON_TILES=sm_90`` or ``gfx942``
    the interpreter takes the tiles and split-K that GPU would (``runtime.emulated_gpu``).
    """
    fp8 = a_kind == A_FP8 or b_kind == B_FP8
    if interpreting() and emulated_gpu() is None:
        bk = 128 if fp8 else min(1024, max(16, next_pow2(k)))
        bn = min(2048, max(16, next_pow2(n)), MAX_BLOCK_NUMEL // bk)  # the (K, N) tile stays a legal block
        return GemmConfig(min(64, max(16, next_pow2(m))), bn, bk, 8, 4, 1, 1)
    bk = 128 if (a_kind != A_HP or fp8) else 64
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    if tiles_for_hip() or a_dtype == torch.float32:
        bm = min(bm, 64)  # MI300 has 64 KiB of LDS per CU; fp32 A tiles are twice as large
    bn = 128 if bm >= 64 else 64
    if dual:
        bn = min(bn, 64)  # two accumulators
    bn = min(bn, max(16, next_pow2(n)))
    warps = 8 if bm * bn >= 128 * 128 else 4
    stages = 3 if bm >= 64 else 4
    split = 1
    k_tiles = cdiv(k, bk)
    if allow_split and k_tiles >= 4:
        tiles = cdiv(m, bm) * cdiv(n, bn)
        sms = sm_count(device.index if device is not None and device.index is not None else 0)
        if tiles < sms:
            split = max(1, min(cdiv(sms, tiles), k_tiles // 2, 32))
    return GemmConfig(bm, bn, bk, 8, warps, stages, split)


def launch_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor | None,
    b: torch.Tensor,
    b_scale: torch.Tensor | None,
    out: torch.Tensor,
    *,
    a_kind: int,
    b_kind: int,
    m: int,
    cdt: torch.dtype,
    b2: torch.Tensor | None = None,
    b2_scale: torch.Tensor | None = None,
    rows: torch.Tensor | None = None,
    rows_mode: int = ROWS_PLAIN,
    topk: int = 1,
    block_expert: torch.Tensor | None = None,
    row_weight: torch.Tensor | None = None,
    config: GemmConfig | None = None,
) -> torch.Tensor:
    """Launch the kernel (arguments already checked by a public wrapper). B is (N, K) or (E, N, K).

    Returns ``out``; with ``config.split_k > 1`` ``out`` must be float32 ``(split_k, m, N)``.
    """
    n, k = b.shape[-2], b.shape[-1]
    if config is None:
        config = pick_config(m, n, k, a_kind, b_kind, b2 is not None, device=a.device)
    grouped = block_expert is not None
    k_tiles = cdiv(k, config.block_k)
    per_split = cdiv(k_tiles, config.split_k)
    splits = cdiv(k_tiles, per_split) if k_tiles else 1
    b3 = b if b.dim() == 3 else b.unsqueeze(0)
    bs = b_scale
    if bs is not None and b_kind == B_FP8:
        bs = bs if bs.dim() == 3 else bs.unsqueeze(0)
    elif bs is not None:
        bs = bs if bs.dim() == 2 else bs.unsqueeze(0)
    if bs is None:
        bse, bsn, bsk = 0, 0, 0
    elif b_kind == B_FP8:
        bse, bsn, bsk = bs.stride(0), bs.stride(1), bs.stride(2)
    else:
        bse, bsn, bsk = bs.stride(0), bs.stride(1), 0
    if a_scale is None:
        asm, ask = 0, 0
    else:
        asm, ask = a_scale.stride(0), (a_scale.stride(1) if a_scale.dim() == 2 else 0)
    c3 = out if out.dim() == 3 else out.unsqueeze(0)
    dummy = b3  # unused pointer arguments
    grid = (cdiv(m, config.block_m) * cdiv(n, config.block_n), splits)
    _gemm_kernel[grid](
        a, dummy if a_scale is None else a_scale, b3, dummy if bs is None else bs,
        dummy if b2 is None else b2, dummy if b2_scale is None else b2_scale, c3,
        dummy if rows is None else rows, dummy if block_expert is None else block_expert,
        dummy if row_weight is None else row_weight,
        m, n, k, topk, per_split,
        a.stride(0), a.stride(1), asm, ask,
        b3.stride(0), b3.stride(1), b3.stride(2), bse, bsn, bsk,
        c3.stride(0), c3.stride(1), c3.stride(2),
        A_KIND=a_kind, B_KIND=b_kind, ROWS=rows_mode, GROUPED=grouped, DUAL=b2 is not None,
        CDT=TL_DTYPE[cdt], OUT=TL_DTYPE[out.dtype], HP_IEEE=interpreting() or cdt == torch.float32,
        QB=QBLOCK, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        GROUP_M=config.group_m, **launch_opts(config.num_warps, config.num_stages),
    )  # fmt: skip
    return out


def _dense(a, a_scale, b, b_scale, a_kind, b_kind, out_dtype, split_k) -> torch.Tensor:
    m, n, k = a.shape[0], b.shape[0], b.shape[1]
    config = pick_config(m, n, k, a_kind, b_kind, device=a.device, a_dtype=a.dtype)
    if split_k is not None:
        config = dataclasses.replace(config, split_k=split_k)
    if m == 0 or n == 0:
        return torch.zeros((m, n), dtype=out_dtype, device=a.device)
    k_tiles = cdiv(k, config.block_k)
    splits = cdiv(k_tiles, cdiv(k_tiles, config.split_k)) if k_tiles else 1
    if splits == 1:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
        return launch_gemm(
            a, a_scale, b, b_scale, out, a_kind=a_kind, b_kind=b_kind, m=m, cdt=_cdt(a, out_dtype), config=config
        )
    part = torch.empty((splits, m, n), dtype=torch.float32, device=a.device)
    launch_gemm(a, a_scale, b, b_scale, part, a_kind=a_kind, b_kind=b_kind, m=m, cdt=_cdt(a, out_dtype), config=config)
    return part.sum(0).to(out_dtype)


def _cdt(a: torch.Tensor, out_dtype: torch.dtype) -> torch.dtype:
    return a.dtype if a.dtype in HP_DTYPES else out_dtype


def fp8_block_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    split_k: int | None = None,
) -> torch.Tensor:
    """Block-scaled FP8 GEMM: a (M, K) fp8 with a_scale (M, ceil(K/128)) fp32 (1 x 128 groups),
    b (N, K) fp8 (same dtype) with b_scale (ceil(N/128), ceil(K/128)) fp32 -> (M, N) out_dtype.

    ``y = (a * a_scale) @ (b * b_scale).T`` with fp32 accumulation.
    """
    where = "fp8_block_gemm"
    check_tensor(where, "a", a, FP8_DTYPES, ndim=2)
    m, k = a.shape
    check_tensor(where, "b", b, (a.dtype,), ndim=2)
    n = b.shape[0]
    require(b.shape[1] == k, where, f"a is (M, K) = {list(a.shape)} but b is (N, K) = {list(b.shape)}")
    check_tensor(where, "a_scale", a_scale, (torch.float32,), shape=(m, cdiv(k, QBLOCK)))
    check_tensor(where, "b_scale", b_scale, (torch.float32,), shape=(cdiv(n, QBLOCK), cdiv(k, QBLOCK)))
    require(out_dtype in HP_DTYPES, where, f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    check_device(where, a=a, a_scale=a_scale, b=b, b_scale=b_scale)
    a, b = last_dim_contiguous(a), last_dim_contiguous(b)
    return _dense(a, a_scale, b, b_scale, A_FP8, B_FP8, out_dtype, split_k)


def int8_gemm(
    a: torch.Tensor,
    a_scale: torch.Tensor,
    b: torch.Tensor,
    b_scale: torch.Tensor,
    out_dtype: torch.dtype = torch.bfloat16,
    split_k: int | None = None,
) -> torch.Tensor:
    """INT8 GEMM: a (M, K) int8 with a_scale (M,) fp32 per token, b (N, K) int8 with b_scale (N,)
    fp32 per channel -> (M, N) out_dtype: exact int32 accumulation, then ``* a_scale[m] * b_scale[n]``.
    """
    where = "int8_gemm"
    check_tensor(where, "a", a, (torch.int8,), ndim=2)
    m, k = a.shape
    check_tensor(where, "b", b, (torch.int8,), ndim=2)
    n = b.shape[0]
    require(b.shape[1] == k, where, f"a is (M, K) = {list(a.shape)} but b is (N, K) = {list(b.shape)}")
    check_tensor(where, "a_scale", a_scale, (torch.float32,), shape=(m,))
    check_tensor(where, "b_scale", b_scale, (torch.float32,), shape=(n,))
    require(out_dtype in HP_DTYPES, where, f"out_dtype must be float32, bfloat16 or float16, got {out_dtype}")
    check_device(where, a=a, a_scale=a_scale, b=b, b_scale=b_scale)
    a, b = last_dim_contiguous(a), last_dim_contiguous(b)
    return _dense(a, a_scale, b, b_scale, A_INT8, B_INT8, out_dtype, split_k)


def weight_gemm(
    x: torch.Tensor, data: torch.Tensor, scale: torch.Tensor | None, fmt: str, split_k: int | None = None
) -> torch.Tensor:
    """Activations in the compute dtype times a weight in any format: x (M, K) -> (M, N) x.dtype.

    fmt "hp": data (N, K) x.dtype. "fp8_block": data (N, K) fp8, scale (ceil(N/128), ceil(K/128)).
    "int8_w8a8" / "int8_wo": data (N, K) int8, scale (N,). The weight tile is dequantized to x.dtype
    in registers (``y = x @ dequant(w).T``, as cpu_ref with act_quant "none").
    """
    where = "weight_gemm"
    check_tensor(where, "x", x, HP_DTYPES, ndim=2)
    m, k = x.shape
    require(fmt in ("hp", "fp8_block", "int8_w8a8", "int8_wo"), where, f"unknown weight format {fmt!r}")
    b_kind = {"hp": B_HP, "fp8_block": B_FP8}.get(fmt, B_INT8)
    data_dtypes = {B_HP: (x.dtype,), B_FP8: FP8_DTYPES, B_INT8: (torch.int8,)}[b_kind]
    check_tensor(where, "weight", data, data_dtypes, ndim=2)
    n = data.shape[0]
    require(data.shape[1] == k, where, f"x is (M, K) = {list(x.shape)} but the weight is (N, K) = {list(data.shape)}")
    if b_kind == B_FP8:
        check_tensor(where, "scale", scale, (torch.float32,), shape=(cdiv(n, QBLOCK), cdiv(k, QBLOCK)))
    elif b_kind == B_INT8:
        check_tensor(where, "scale", scale, (torch.float32,), shape=(n,))
    check_device(where, x=x, weight=data, scale=scale if b_kind != B_HP else None)
    x, data = last_dim_contiguous(x), last_dim_contiguous(data)
    return _dense(x, None, data, scale if b_kind != B_HP else None, A_HP, b_kind, x.dtype, split_k)
