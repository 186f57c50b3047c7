"""Activation quantization: FP8 per token per 128 channels, INT8 per token.

Same arithmetic as ``dsv3.backends.cpu_ref.quant`` (amax floored at 1e-4, ``s = amax / max``,
optional UE8M0 power-of-two scales rounded up, clamp, round to nearest even), so the
quantized bits match the reference exactly, non-finite inputs included (the rule in
``dsv3.weights``). Triton's ``maximum``/``minimum`` drop NaN by default (fmax semantics on a GPU,
``np.fmax``/``np.nanmax`` in the interpreter), so a group's NaN or inf is carried past the max
reduction by a sum (:func:`~.jit_utils.nan_if_nonfinite`) and the clamps say ``PropagateNan.ALL``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.weights import AMAX_FLOOR, FP8_DTYPES, FP8_MAX, INT8_MAX

from .jit_utils import nan_if_nonfinite, round_half_even, round_to_fp8_grid, round_up_pow2, row_max
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

#: The triton type of each fp8 storage dtype, and the byte its quantizer stores for NaN (``dsv3.weights``, rule 2).
_TL_FP8 = {torch.float8_e4m3fn: tl.float8e4nv, torch.float8_e4m3fnuz: tl.float8e4b8}
_FP8_NAN = {torch.float8_e4m3fn: 0x7F, torch.float8_e4m3fnuz: 0x80}


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
    FP8_TY: tl.constexpr,
    NAN_BITS: tl.constexpr,
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r_ok = rows < M
    r64 = rows.to(tl.int64)
    for g in range(0, n_groups):
        col = g * GROUP + tl.arange(0, GROUP)
        mask = r_ok[:, None] & (col[None, :] < K)
        x = tl.load(x_ptr + r64[:, None] * stride_xm + col[None, :], mask=mask, other=0.0).to(tl.float32)
        amax = row_max(tl.abs(x), 1) + nan_if_nonfinite(x, 1)  # (ROWS,): NaN if the group holds a NaN or inf
        amax = tl.maximum(amax, AMAX_MIN, propagate_nan=tl.PropagateNan.ALL)
        s = tl.math.div_rn(amax, tl.full(amax.shape, FP8_MAX_V, tl.float32))
        if UE8M0:
            s = round_up_pow2(s)
        y = tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape))  # NaN in a group with a NaN scale
        y = tl.minimum(
            tl.maximum(y, -FP8_MAX_V, propagate_nan=tl.PropagateNan.ALL), FP8_MAX_V, propagate_nan=tl.PropagateNan.ALL
        )
        qb = round_to_fp8_grid(y, EMIN).to(FP8_TY).to(tl.uint8, bitcast=True)
        # q_ptr is the fp8 tensor's bytes: a NaN is stored by its bits (the interpreter's cast makes it 384)
        qb = tl.where(y != y, tl.full(qb.shape, NAN_BITS, tl.uint8), qb)
        tl.store(q_ptr + r64[:, None] * stride_qm + col[None, :], qb, mask=mask)
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
        x, q.view(torch.uint8), s, m, k, n_groups, x.stride(0), q.stride(0), s.stride(0),
        FP8_MAX_V=FP8_MAX[fp8_dtype], EMIN=FP8_EMIN[fp8_dtype], UE8M0=scale_fmt == "ue8m0",
        AMAX_MIN=AMAX_FLOOR, GROUP=QBLOCK, ROWS=rows, FP8_TY=_TL_FP8[fp8_dtype], NAN_BITS=_FP8_NAN[fp8_dtype],
        num_warps=4,
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
        amax = tl.maximum(amax, tl.abs(x), propagate_nan=tl.PropagateNan.ALL)  # keeps NaN and inf
    amax_row = tl.maximum(row_max(amax, 1) + nan_if_nonfinite(amax, 1), AMAX_MIN, propagate_nan=tl.PropagateNan.ALL)
    s = tl.math.div_rn(amax_row, tl.full((ROWS,), QMAX, tl.float32))
    for k0 in range(0, K, BLOCK):
        col = k0 + tl.arange(0, BLOCK)
        mask = r_ok[:, None] & (col[None, :] < K)
        x = tl.load(x_ptr + r64[:, None] * stride_xm + col[None, :], mask=mask, other=0.0).to(tl.float32)
        y = round_half_even(tl.math.div_rn(x, tl.broadcast_to(s[:, None], x.shape)))
        y = tl.where(y == y, tl.minimum(tl.maximum(y, -QMAX), QMAX), 0.0)  # int8 has no NaN: 0, the scale says NaN
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
