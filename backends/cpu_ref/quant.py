"""Exact emulation of the low-precision formats: the reference for every GPU/NPU kernel.

Quantization rounds with the formats' own casts (``tensor.to(torch.float8_e4m3fn)``,
round-half-to-even for int8); products are accumulated in float32 (fp8) or exactly (int8,
through float64, which holds every int32 sum exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.weights import FP8_BLOCK, HP, INT8_W8A8, INT8_WO, Weight

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}
AMAX_FLOOR = 1e-4  # keeps all-zero blocks finite, as DeepGEMM does


def _expand_blocks(scale: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """scale (..., ceil(rows/b), ceil(cols/b)) -> (..., rows, cols), each block's scale repeated."""
    full = scale.repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return full[..., :rows, :cols]


def dequantize(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """w (..., out, in) in any format -> (..., out, in) dtype."""
    if w.fmt == HP:
        return w.data.to(dtype)
    if w.fmt == FP8_BLOCK:
        scale = _expand_blocks(w.scale.float(), w.out_features, w.in_features, w.block_size)
        return (w.data.float() * scale).to(dtype)
    if w.fmt in (INT8_W8A8, INT8_WO):
        return (w.data.float() * w.scale.float().unsqueeze(-1)).to(dtype)
    raise ValueError(f"unknown weight format {w.fmt!r}")


def round_scale_ue8m0(scale: torch.Tensor) -> torch.Tensor:
    """Round a positive scale up to the next power of two (the UE8M0 scale format)."""
    return torch.exp2(torch.ceil(torch.log2(scale)))


def quantize_act_fp8(
    x: torch.Tensor, block: int = 128, fp8_dtype: torch.dtype = torch.float8_e4m3fn, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (q (M, K) fp8, s (M, ceil(K/block)) fp32) with x ~= q * s per 1 x block group."""
    m, k = x.shape
    pad = (-k) % block
    xf = F.pad(x.float(), (0, pad)).view(m, -1, block)  # (M, K/b, b)
    amax = xf.abs().amax(dim=-1).clamp(min=AMAX_FLOOR)
    s = amax / FP8_MAX[fp8_dtype]
    if scale_fmt == "ue8m0":
        s = round_scale_ue8m0(s)
    q = (xf / s.unsqueeze(-1)).clamp(-FP8_MAX[fp8_dtype], FP8_MAX[fp8_dtype]).to(fp8_dtype)
    return q.view(m, -1)[:, :k], s


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (q (M, K) int8, s (M,) fp32), symmetric per token: s = amax / 127."""
    xf = x.float()
    s = xf.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / 127.0
    q = torch.round(xf / s.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, s


def quantize_weight_fp8(w: torch.Tensor, block: int = 128, fp8_dtype=torch.float8_e4m3fn) -> Weight:
    """w (out, in) float -> fp8_block Weight, one scale per block x block tile (s = amax / fp8 max)."""
    rows, cols = w.shape[-2:]
    pr, pc = (-rows) % block, (-cols) % block
    wf = F.pad(w.float(), (0, pc, 0, pr))
    tiles = wf.unflatten(-2, (-1, block)).unflatten(-1, (-1, block))  # (..., R/b, b, C/b, b)
    amax = tiles.abs().amax(dim=(-3, -1)).clamp(min=AMAX_FLOOR)  # (..., R/b, C/b)
    scale = amax / FP8_MAX[fp8_dtype]
    q = (wf / _expand_blocks(scale, rows + pr, cols + pc, block)).to(fp8_dtype)
    return Weight(q[..., :rows, :cols].contiguous(), FP8_BLOCK, scale.float(), block)


def quantize_weight_int8(w: torch.Tensor, fmt: str = INT8_W8A8) -> Weight:
    """w (..., out, in) float -> int8 Weight with symmetric per-output-channel scales (s = amax / 127)."""
    wf = w.float()
    scale = wf.abs().amax(dim=-1).clamp(min=AMAX_FLOOR) / 127.0
    q = torch.round(wf / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return Weight(q, fmt, scale)


def linear_dequant(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x (..., in) -> (..., out): weight dequantized to x.dtype, product in x.dtype."""
    return F.linear(x, dequantize(w, x.dtype))


def linear_fp8_dynamic(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x (..., in) -> (..., out): x quantized per token per 128 channels, fp8 x fp8 products, fp32 sums."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    q, s = quantize_act_fp8(x2, w.block_size, w.data.dtype, w.scale_fmt)
    x_deq = q.float() * s.repeat_interleave(w.block_size, dim=-1)[:, : shape[-1]]
    y = F.linear(x_deq, dequantize(w, torch.float32))
    return y.to(x.dtype).reshape(*shape[:-1], w.out_features)


def linear_int8_dynamic(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x (..., in) -> (..., out): x quantized per token to int8, exact integer products, scaled back."""
    shape = x.shape
    q, s = quantize_act_int8(x.reshape(-1, shape[-1]))
    acc = F.linear(q.double(), w.data.double())  # every int32 sum is exact in float64
    y = acc * s.double().unsqueeze(-1) * w.scale.double()
    return y.to(x.dtype).reshape(*shape[:-1], w.out_features)


def linear_for(fmt: str, act_quant: str):
    """The reference linear for a weight format and activation-quantization mode."""
    if fmt == HP:
        return lambda x, w: F.linear(x, w.data)
    if act_quant == "dynamic" and fmt == FP8_BLOCK:
        return linear_fp8_dynamic
    if act_quant == "dynamic" and fmt == INT8_W8A8:
        return linear_int8_dynamic
    return linear_dequant
