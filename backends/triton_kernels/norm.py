"""RMSNorm and SiLU-and-multiply, row by row."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .jit_utils import TL_DTYPE, round_to, row_sum
from .runtime import HP_DTYPES, cdiv, check_device, check_tensor, interpreting, next_pow2, require


@triton.jit(do_not_specialize=["M"])
def _rms_norm_kernel(
    x_ptr, w_ptr, o_ptr, M, D, stride_x, stride_o, eps, OUT: tl.constexpr, ROWS: tl.constexpr, BLOCK: tl.constexpr
):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    r64 = rows.to(tl.int64)
    col = tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (col[None, :] < D)
    x = tl.load(x_ptr + r64[:, None] * stride_x + col[None, :], mask=mask, other=0.0).to(tl.float32)
    ms = row_sum(x * x, 1) / D  # (ROWS,)
    inv = tl.math.div_rn(tl.full(ms.shape, 1.0, tl.float32), tl.sqrt_rn(ms + eps))
    w = tl.load(w_ptr + col, mask=col < D, other=0.0).to(tl.float32)
    tl.store(o_ptr + r64[:, None] * stride_o + col[None, :], round_to(x * inv[:, None] * w[None, :], OUT), mask=mask)


def _rows_per_program(m: int, block: int) -> int:
    """Rows per program: one on a GPU (each row is a reduction), many under the interpreter."""
    if interpreting():
        return max(1, min(next_pow2(m), 8192 // block, 64))
    return 1


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) float, weight (D,) -> (..., D) x.dtype: ``x / sqrt(mean(x**2) + eps) * weight`` in fp32."""
    where = "rms_norm"
    check_tensor(where, "x", x, HP_DTYPES)
    require(x.dim() >= 1, where, "x must have at least one dim")
    d = x.shape[-1]
    check_tensor(where, "weight", weight, HP_DTYPES, shape=(d,))
    check_device(where, x=x, weight=weight)
    x2 = x.reshape(-1, d)  # a view when the leading dims merge (e.g. a split of the kv projection)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty((x2.shape[0], d), dtype=x.dtype, device=x.device)
    if x2.shape[0] == 0:
        return out.view(x.shape)
    block = next_pow2(d)
    warps = 1 if block <= 512 else 4 if block <= 4096 else 8
    m = x2.shape[0]
    rows = _rows_per_program(m, block)
    _rms_norm_kernel[(cdiv(m, rows),)](
        x2, weight, out, m, d, x2.stride(0), out.stride(0), float(eps),
        OUT=TL_DTYPE[x.dtype], ROWS=rows, BLOCK=block, num_warps=warps,
    )  # fmt: skip
    return out.view(x.shape)


@triton.jit(do_not_specialize=["M"])
def _silu_mul_kernel(
    g_ptr,
    u_ptr,
    o_ptr,
    M,
    N_COLS,
    stride_g,
    stride_u,
    stride_o,
    OUT: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rows = (tl.program_id(0) * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    col = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = (rows[:, None] < M) & (col[None, :] < N_COLS)
    g = tl.load(g_ptr + rows[:, None] * stride_g + col[None, :], mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * stride_u + col[None, :], mask=mask, other=0.0).to(tl.float32)
    e = tl.exp(-tl.abs(g))  # never overflows
    sig = tl.where(g >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    s = round_to(g * sig, OUT).to(tl.float32)  # F.silu rounds before the product
    tl.store(o_ptr + rows[:, None] * stride_o + col[None, :], round_to(s * u, OUT), mask=mask)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) -> silu(gate) * up (..., I) gate.dtype."""
    where = "silu_and_mul"
    check_tensor(where, "gate", gate, HP_DTYPES)
    check_tensor(where, "up", up, (gate.dtype,), shape=tuple(gate.shape))
    check_device(where, gate=gate, up=up)
    i = gate.shape[-1]
    g2, u2 = gate.reshape(-1, i), up.reshape(-1, i)
    g2 = g2 if g2.stride(-1) == 1 else g2.contiguous()
    u2 = u2 if u2.stride(-1) == 1 else u2.contiguous()
    out = torch.empty((g2.shape[0], i), dtype=gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out.view(gate.shape)
    block = min(next_pow2(i), 1024)
    m = g2.shape[0]
    rows = _rows_per_program(m, block)
    _silu_mul_kernel[(cdiv(m, rows), cdiv(i, block))](
        g2, u2, out, m, i, g2.stride(0), u2.stride(0), out.stride(0),
        OUT=TL_DTYPE[gate.dtype], ROWS=rows, BLOCK=block, num_warps=4,
    )  # fmt: skip
    return out.view(gate.shape)
