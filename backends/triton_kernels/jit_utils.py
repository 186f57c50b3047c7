"""Helpers used inside kernels: exact rounding and reductions, and the torch -> triton dtype map.

The kernels call no jit function of triton's standard library (``tl.sum``, ``tl.max``,
``tl.zeros``, ``tl.cdiv``...): in the interpreter those only work if TRITON_INTERPRET was set
before triton itself was imported, which a test process cannot promise. The reductions here pass
the standard library's combine functions to the builtin ``tl.reduce``, which the interpreter
recognises and runs with numpy. So the kernels run interpreted whenever TRITON_INTERPRET is set
when the kernel modules are first imported.

Each rounding helper rounds in float32 with integer and power-of-two arithmetic, so the final cast is exact.
That gives the same bits on a GPU and in Triton's interpreter (whose float32 -> bfloat16 cast
truncates and whose float32 -> fp8 cast drops the mantissa carry) and matches torch's casts.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import interpreting

#: The triton dtype of each compute dtype (``runtime.HP_DTYPES``), for constexpr dtype arguments.
TL_DTYPE = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def device_helper(fn):
    """``triton.jit`` for a function called from kernels.

    Under the interpreter the function stays plain Python: the interpreter re-patches
    triton.language on every call of a nested jit function (milliseconds each), while a plain
    function sees the kernel's already patched ``tl`` and computes the same thing.
    """
    return fn if interpreting() else triton.jit(fn)


@device_helper
def round_half_even(v):
    """float32 -> nearest integer value (ties to even), as ``torch.round``; exact for |v| < 2**23."""
    f = tl.floor(v)
    d = v - f
    odd = tl.floor(f * 0.5) * 2.0 != f
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@device_helper
def round_to_fp8_grid(y, EMIN: tl.constexpr):
    """float32 already clamped to the fp8 range -> the nearest e4m3 value (ties to even), still float32.

    ``EMIN`` is the smallest normal exponent (-6 for e4m3fn, -7 for e4m3fnuz); below it the spacing
    of subnormals is kept. Zero keeps the sign of ``y`` as torch's cast does.
    """
    bits = y.to(tl.int32, bitcast=True)
    e = tl.maximum(((bits >> 23) & 0xFF) - 127, EMIN)
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 3 mantissa bits
    inv_ulp = ((127 - (e - 3)) << 23).to(tl.float32, bitcast=True)
    r = round_half_even(y * inv_ulp) * ulp
    return tl.where(r == 0.0, y * 0.0, r)


@device_helper
def round_up_pow2(s):
    """Positive normal float32 -> the smallest power of two >= s (the UE8M0 scale format); +inf and NaN
    stay as they are (a NaN's mantissa bits would otherwise carry into the sign: -0.0)."""
    bits = s.to(tl.int32, bitcast=True)
    exp = (bits >> 23) & 0xFF
    up = tl.where((bits & 0x7FFFFF) != 0, exp + 1, exp)
    return tl.where(exp == 0xFF, s, (up << 23).to(tl.float32, bitcast=True))


@device_helper
def round_to(x, DTYPE: tl.constexpr):
    """float32 -> DTYPE with round-to-nearest-even (bfloat16 rounded by hand, see the module docstring)."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.int32, bitcast=True)
        # a NaN with a full mantissa (CUDA's 0x7FFFFFFF) would carry into the sign bit: -0.0
        bits = tl.where(x != x, 0x7FC00000, bits)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
        return bits.to(tl.float32, bitcast=True).to(tl.bfloat16)
    else:
        return x.to(DTYPE)


@device_helper
def row_sum(x, axis: tl.constexpr):
    """Sum of a float32 tile along ``axis``."""
    return tl.reduce(x, axis, tl.standard._sum_combine)


@device_helper
def row_max(x, axis: tl.constexpr):
    """Maximum of a tile along ``axis``; NaN is ignored (max.f32 on a GPU, ``np.nanmax`` interpreted)."""
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@device_helper
def nan_if_nonfinite(x, axis: tl.constexpr):
    """float32 tile -> along ``axis``: NaN where a NaN or an inf lies, else 0. ``row_max(|x|) + this`` is
    the amax of the non-finite rule (``dsv3.weights``); a NaN-propagating combine function instead
    would run element by element in the interpreter."""
    return row_sum(tl.where(tl.abs(x) < float("inf"), 0.0, float("nan")), axis)


@device_helper
def online_softmax_tile(scores, v, m_i, l_i, acc, CDT: tl.constexpr, HP_IEEE: tl.constexpr):
    """Fold one key tile into a running softmax average (flash attention, base 2).

    scores (R, S) float32 in log2 units (-inf where a key is not visible), v (S, D) the tile's values;
    m_i (R,) running max, l_i (R,) running sum of exp2, acc (R, D) float32 running weighted sum.
    Returns the new (m_i, l_i, acc). A row that has seen no visible key yet keeps m = -inf, l = 0,
    acc = 0 (no NaN). HP_IEEE: fp32 products for p @ v; else p is rounded to CDT first.
    """
    m_new = tl.maximum(m_i, row_max(scores, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_use)
    p = tl.exp2(scores - m_use[:, None])
    if HP_IEEE:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(round_to(p, CDT), v)
    return m_new, l_i * alpha + row_sum(p, 1), acc
