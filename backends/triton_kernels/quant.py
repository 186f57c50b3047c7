"""Activation quantization: FP8 per token per 128 channels, INT8 per token.

Same arithmetic as ``dsv3.backends.cpu_ref.quant`` (amax floored at 1e-4, ``s = amax / max``,
optional UE8M0 power-of-two scales rounded up, clamp, round to nearest even), so the
quantized bits match the reference exactly.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.weights import AMAX_FLOOR, FP8_DTYPES, FP8_MAX, INT8_MAX

from .jit_utils import round_half_even, round_to_fp8_grid, round_up_pow2, row_max
from .runtime import (
    FP8_EMIN,
    HP_DTYPES,
    QBLOCK,
    cdiv,
    check_device,
    check_tensor,
    interpreting,
    last_dim_contiguous,
    next_pow2,
    require,
)


@triton.jit(do_not_specialize=["M"])
def _act_quant_fp8_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    n_groups,
    stride_xm,
    stride_qm,
    stride_sm,
    FP8_MAX_V: tl.constexpr,
    EMIN: tl.constexpr,
    UE8M0: tl.constexpr,
    AMAX_MIN: tl.constexpr,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = rows < M
    r64 = rows.to(tl.int64)
    for g in range(0, n_groups):
        col = g * GROUP + tl.arange(0, GROUP)
        mask = r_ok[:, None] & (col[None, :] < K)
        x = tl.load(x_ptr + r64[:, None] * stride_xm + col[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(row_max(tl.abs(x), 1), AMAX_MIN)  # (ROWS,)
        s = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX_V, tl.float32))
        if UE8M0:
            s = round_up_pow2(s)
        y = tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape))
        y = tl.minimum(tl.maximum(y, -FP8_MAX_V), FP8_MAX_V)
        q = round_to_fp8_grid(y, EMIN)
        tl.store(q_ptr + r64[:, None] * stride_qm + col[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)
        tl.store(s_ptr + r64 * stride_sm + g, s, mask=r_ok)


def act_quant_fp8(
    x: torch.Tensor,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    scale_fmt: str | None = None,
    rows_per_program: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (q (M, K) fp8_dtype, s (M, ceil(K/128)) float32), x ~= q * s per 1 x 128 group.

    fp8_dtype: float8_e4m3fn (max 448) or float8_e4m3fnuz (max 240). scale_fmt "ue8m0" rounds each
    scale up to a power of two. rows_per_program: a power of two (None: chosen here).
    """
    where = "act_quant_fp8"
    check_tensor(where, "x", x, HP_DTYPES, ndim=2)
    require(fp8_dtype in FP8_DTYPES, where, f"fp8_dtype must be float8_e4m3fn or float8_e4m3fnuz, got {fp8_dtype}")
    require(scale_fmt in (None, "ue8m0"), where, f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}")
    check_device(where, x=x)
    x = last_dim_contiguous(x)
    m, k = x.shape
    n_groups = cdiv(k, QBLOCK)
    q = torch.empty((m, k), dtype=fp8_dtype, device=x.device)
    s = torch.empty((m, n_groups), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    rows = rows_per_program or _rows_per_program(m)
    _act_quant_fp8_kernel[(cdiv(m, rows),)](
        x, q, s, m, k, n_groups, x.stride(0), q.stride(0), s.stride(0),
        FP8_MAX_V=FP8_MAX[fp8_dtype], EMIN=FP8_EMIN[fp8_dtype], UE8M0=scale_fmt == "ue8m0",
        AMAX_MIN=AMAX_FLOOR, GROUP=QBLOCK, ROWS=rows, num_warps=4,
    )  # fmt: skip
    return q, s


def _rows_per_program(m: int) -> int:
    """Rows per program: the interpreter pays per program, a GPU wants many programs for few rows."""
    if interpreting():
        return min(16, next_pow2(m))
    return 1 if m <= 1024 else 4


@triton.jit(do_not_specialize=["M"])
def _act_quant_int8_kernel(
    x_ptr,
    q_ptr,
    s_ptr,
    M,
    K,
    stride_xm,
    stride_qm,
    AMAX_MIN: tl.constexpr,
    QMAX: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = rows < M
    r64 = rows.to(tl.int64)
    amax = tl.full((ROWS, BLOCK), 0, tl.float32)
    for k0 in range(0, K, BLOCK):
        col = k0 + tl.arange(0, BLOCK)
        mask = r_ok[:, None] & (col[None, :] < K)
        x = tl.load(x_ptr + r64[:, None] * stride_xm + col[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    s = tl.math.div_rn(tl.maximum(row_max(amax, 1), AMAX_MIN), tl.full((ROWS,), QMAX, tl.float32))
    for k0 in range(0, K, BLOCK):
        col = k0 + tl.arange(0, BLOCK)
        mask = r_ok[:, None] & (col[None, :] < K)
        x = tl.load(x_ptr + r64[:, None] * stride_xm + col[None, :], mask=mask, other=0.0).to(tl.float32)
        y = round_half_even(tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape)))
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        tl.store(q_ptr + r64[:, None] * stride_qm + col[None, :], y.to(tl.int8), mask=mask)
    tl.store(s_ptr + rows, s, mask=r_ok)


def act_quant_int8(x: torch.Tensor, rows_per_program: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) float -> (q (M, K) int8, s (M,) float32): symmetric per token, s = amax / INT8_MAX (127)."""
    where = "act_quant_int8"
    check_tensor(where, "x", x, HP_DTYPES, ndim=2)
    check_device(where, x=x)
    x = last_dim_contiguous(x)
    m, k = x.shape
    q = torch.empty((m, k), dtype=torch.int8, device=x.device)
    s = torch.empty((m,), dtype=torch.float32, device=x.device)
    if m == 0:
        return q, s
    rows = rows_per_program or _rows_per_program(m)
    block = min(next_pow2(k), max(128, 2048 // rows))
    _act_quant_int8_kernel[(cdiv(m, rows),)](
        x,
        q,
        s,
        m,
        k,
        x.stride(0),
        q.stride(0),
        AMAX_MIN=AMAX_FLOOR,
        QMAX=INT8_MAX,
        ROWS=rows,
        BLOCK=block,
        num_warps=4,
    )
    return q, s
