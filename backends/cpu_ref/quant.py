"""Exact emulation of the low-precision formats: the reference for every GPU/NPU kernel.

The weight-format math (quantize, dequantize, scales) lives in ``dsv3.quantize`` and is
re-exported here; this module adds activation quantization and the reference linears.

Quantization rounds with the formats' own casts (``tensor.to(torch.float8_e4m3fn)``,
round-half-to-even for int8); products are accumulated in float32 (fp8) or exactly (int8,
through float64, which holds every int32 sum exactly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.quantize import (  # noqa: F401  (re-exported: kernels' tests import them from here)
    AMAX_FLOOR,
    FP8_MAX,
    dequantize,
    expand_blocks,
    group_amax,
    quantize_int8_values,
    quantize_weight_fp8,
    quantize_weight_int8,
    round_scale_ue8m0,
)
from dsv3.weights import FP8_BLOCK, HP, INT8_W8A8, Weight


def quantize_act_fp8(
    x: torch.Tensor, block: int = 128, fp8_dtype: torch.dtype = torch.float8_e4m3fn, scale_fmt: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (q (M, K) fp8, s (M, ceil(K/block)) fp32) with x ~= q * s per 1 x block group.

    Non-finite inputs follow the rule in ``dsv3.weights``: a group holding a NaN or an inf gets a NaN
    scale and NaN in every value.
    """
    m, k = x.shape
    pad = (-k) % block
    xf = F.pad(x.float(), (0, pad)).view(m, -1, block)  # (M, K/b, b)
    s = group_amax(xf, dim=-1) / FP8_MAX[fp8_dtype]
    if scale_fmt == "ue8m0":
        s = round_scale_ue8m0(s)
    q = (xf / s.unsqueeze(-1)).clamp(-FP8_MAX[fp8_dtype], FP8_MAX[fp8_dtype]).to(fp8_dtype)
    return q.view(m, -1)[:, :k], s


def quantize_act_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (M, K) -> (q (M, K) int8, s (M,) fp32), symmetric per token: s = amax / 127.

    A row holding a NaN or an inf gets a NaN scale and q = 0 (the non-finite rule, ``dsv3.weights``).
    """
    xf = x.float()
    s = group_amax(xf, dim=-1) / 127.0
    return quantize_int8_values(xf, s.unsqueeze(-1)), s


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


def linear_hp(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x (..., in), w hp (out, in) in x.dtype -> (..., out): a plain matrix product."""
    return F.linear(x, w.data)


def linear_for(fmt: str, act_quant: str):
    """The reference linear for a weight format and activation-quantization mode."""
    if fmt == HP:
        return linear_hp
    if act_quant == "dynamic" and fmt == FP8_BLOCK:
        return linear_fp8_dynamic
    if act_quant == "dynamic" and fmt == INT8_W8A8:
        return linear_int8_dynamic
    return linear_dequant


# ---------------------------------------------------------------- a stack of weights (routed experts at decode)
# ``batched(x (G, M, in), w: Weight (G, out, in)) -> (G, M, out)``: group g is ``linear(x[g], w[g])`` of the
# same format, as one batched product (bmm gives what F.linear gives for each group: checked bit for bit).


def batched_hp(x: torch.Tensor, w: Weight) -> torch.Tensor:
    return torch.bmm(x, w.data.transpose(1, 2))


def batched_dequant(x: torch.Tensor, w: Weight) -> torch.Tensor:
    return torch.bmm(x, dequantize(w, x.dtype).transpose(1, 2))


def batched_fp8_dynamic(x: torch.Tensor, w: Weight) -> torch.Tensor:
    g, m, k = x.shape
    q, s = quantize_act_fp8(x.reshape(g * m, k), w.block_size, w.data.dtype, w.scale_fmt)
    x_deq = (q.float() * s.repeat_interleave(w.block_size, dim=-1)[:, :k]).view(g, m, k)
    return torch.bmm(x_deq, dequantize(w, torch.float32).transpose(1, 2)).to(x.dtype)


def batched_int8_dynamic(x: torch.Tensor, w: Weight) -> torch.Tensor:
    g, m, k = x.shape
    q, s = quantize_act_int8(x.reshape(g * m, k))
    acc = torch.bmm(q.double().view(g, m, k), w.data.double().transpose(1, 2))  # (G, M, out), exact
    y = acc * s.double().view(g, m, 1) * w.scale.double().unsqueeze(1)
    return y.to(x.dtype)


def batched_linear_for(fmt: str, act_quant: str):
    """``linear_for(fmt, act_quant)`` over a stack of weights, one per group (see above)."""
    if fmt == HP:
        return batched_hp
    if act_quant == "dynamic" and fmt == FP8_BLOCK:
        return batched_fp8_dynamic
    if act_quant == "dynamic" and fmt == INT8_W8A8:
        return batched_int8_dynamic
    return batched_dequant
