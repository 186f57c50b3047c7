"""Weight-format arithmetic shared by the loader, ``dsv3 convert`` and the reference backend.

Plain PyTorch, no hardware. Quantization rounds with the formats' own casts
(``tensor.to(torch.float8_e4m3fn)`` rounds to nearest even; int8 uses ``torch.round``, also
half-to-even), so what is written here is bit-for-bit what a checkpoint in that format holds.

- fp8_block: ``W (..., out, in)`` is cut into ``block x block`` tiles; each tile has one float32
  scale ``s = amax(|tile|) / FP8_MAX`` (``weight_scale_inv`` in the checkpoint) and
  ``q = fp8(W / s)``; ``dequant = q * s``.
- non-finite values: a group holding a NaN or an inf gets a NaN scale and NaN codes (int8: 0), see
  the rule in ``dsv3.weights``; UE8M0 rounding keeps inf and NaN scales.
- int8 (w8a8 and weight-only): one float32 scale per output channel, ``s = amax(|row|) / 127``
  and ``q = round(W / s)`` in ``[-127, 127]``; ``dequant = q * s``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .weights import (
    AMAX_FLOOR,
    FP8_BLOCK,
    FP8_BLOCK_SIZE,
    FP8_MAX,
    HP,
    INT8_MAX,
    INT8_W8A8,
    INT8_WO,
    Weight,
)


def expand_blocks(scale: torch.Tensor, rows: int, cols: int, block: int = FP8_BLOCK_SIZE) -> torch.Tensor:
    """scale (..., ceil(rows/b), ceil(cols/b)) -> (..., rows, cols), each block's scale repeated."""
    full = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return full[..., :rows, :cols]


def group_amax(x: torch.Tensor, dim: int | tuple[int, ...]) -> torch.Tensor:
    """max |x| over ``dim``, floored at AMAX_FLOOR; NaN for a group holding a NaN or an inf (the non-finite
    rule, ``dsv3.weights``: such a group's scale is NaN)."""
    amax = x.abs().amax(dim=dim)
    amax = torch.where(torch.isfinite(x).all(dim=dim), amax, torch.full_like(amax, float("nan")))
    return amax.clamp(min=AMAX_FLOOR)  # clamp keeps NaN


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round a positive float32 scale up to the next power of two (the UE8M0 scale format).

    Rounding up (never down) keeps ``amax / scale <= FP8_MAX``, so nothing saturates. A ``+inf`` or
    NaN scale stays what it is (the non-finite rule, ``dsv3.weights``): it is never made finite.
    """
    mantissa, exponent = torch.frexp(scale)  # scale = mantissa * 2**exponent, mantissa in [0.5, 1)
    # exact, unlike exp2(ceil(log2(s))), whose log2 rounds 2**-7 * (1 + 2**-23) down to -7
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    rounded = torch.ldexp(torch.ones_like(scale), exponent)
    # frexp gives inf and NaN an exponent of 0: without this they would "round" to 1.0
    return torch.where(torch.isfinite(scale), rounded, scale)


def dequantize(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """w (..., out, in) in any format -> (..., out, in) dtype.

    Products are formed in float32 (exact for fp8 x power-of-two scales) and rounded once to dtype.
    """
    if w.fmt == HP:
        return w.data.to(dtype)
    if w.fmt == FP8_BLOCK:
        scale = expand_blocks(w.scale.float(), w.out_features, w.in_features, w.block_size)
        return (w.data.float() * scale).to(dtype)
    if w.fmt in (INT8_W8A8, INT8_WO):
        return (w.data.float() * w.scale.float().unsqueeze(-1)).to(dtype)
    raise ValueError(f"unknown weight format {w.fmt!r}")


def quantize_weight_fp8(
    w: torch.Tensor,
    block: int = FP8_BLOCK_SIZE,
    fp8_dtype: torch.dtype = torch.float8_e4m3fn,
    scale_fmt: str | None = None,
) -> Weight:
    """w (..., out, in) float -> fp8_block Weight: data (..., out, in) fp8, scale (..., ceil(out/b), ceil(in/b)) fp32.

    One scale per block x block tile, ``s = amax / FP8_MAX`` (rounded up to a power of two when
    ``scale_fmt == "ue8m0"``). Edge tiles are the partial tiles at the ends of each dimension.
    """
    rows, cols = w.shape[-2:]
    pr, pc = (-rows) % block, (-cols) % block
    wf = F.pad(w.float(), (0, pc, 0, pr))
    tiles = wf.unflatten(-2, (-1, block)).unflatten(-1, (-1, block))  # (..., R/b, b, C/b, b)
    amax = group_amax(tiles, dim=(-3, -1))  # (..., R/b, C/b)
    fmax = FP8_MAX[fp8_dtype]
    scale = amax / fmax
    if scale_fmt == "ue8m0":
        scale = round_scale_ue8m0(scale)
    # amax / (amax / fmax) can land one float32 ulp above fmax: clamp so the cast never overflows
    q = (wf / expand_blocks(scale, rows + pr, cols + pc, block)).clamp(-fmax, fmax).to(fp8_dtype)
    return Weight(q[..., :rows, :cols].contiguous(), FP8_BLOCK, scale.float(), block, scale_fmt)


def quantize_weight_int8(w: torch.Tensor, fmt: str = INT8_W8A8) -> Weight:
    """w (..., out, in) float -> int8 Weight: data (..., out, in) int8, scale (..., out) fp32.

    Symmetric per output channel: ``s = amax(|row|) / 127``, ``q = round(w / s)`` in [-127, 127].
    """
    wf = w.float()
    scale = group_amax(wf, dim=-1) / INT8_MAX
    q = quantize_int8_values(wf, scale.unsqueeze(-1))
    return Weight(q, fmt, scale)


def quantize_int8_values(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """float32 x, scale broadcastable to x -> int8 ``round(x / scale)`` in [-127, 127] (half to even).

    int8 holds no NaN: a NaN quotient (a row with a NaN scale) is stored as 0 and the scale carries
    the NaN (the non-finite rule, ``dsv3.weights``).
    """
    y = torch.round(x / scale).clamp(-INT8_MAX, INT8_MAX)
    return torch.where(torch.isnan(y), torch.zeros_like(y), y).to(torch.int8)


def quantize_weight(w: torch.Tensor, fmt: str, scale_fmt: str | None = None) -> Weight:
    """w (..., out, in) float -> Weight in ``fmt`` (hp returns w itself)."""
    if fmt == HP:
        return Weight(w, HP)
    if fmt == FP8_BLOCK:
        return quantize_weight_fp8(w, scale_fmt=scale_fmt)
    if fmt in (INT8_W8A8, INT8_WO):
        return quantize_weight_int8(w, fmt)
    raise ValueError(f"unknown weight format {fmt!r}")


def quantization_config(fmt: str, scale_fmt: str | None = None) -> dict | None:
    """The ``quantization_config`` a checkpoint whose quantized linears are in ``fmt`` carries."""
    if fmt == HP:
        return None
    if fmt == FP8_BLOCK:
        out = {
            "quant_method": "fp8",
            "fmt": "e4m3",
            "activation_scheme": "dynamic",
            "weight_block_size": [FP8_BLOCK_SIZE, FP8_BLOCK_SIZE],
        }
        if scale_fmt:
            out["scale_fmt"] = scale_fmt
        return out
    if fmt in (INT8_W8A8, INT8_WO):
        return {
            "quant_method": "int8",
            "activation_scheme": "dynamic" if fmt == INT8_W8A8 else "weight_only",
            "weight_granularity": "per_channel",
            "symmetric": True,
        }
    raise ValueError(f"unknown weight format {fmt!r}")
