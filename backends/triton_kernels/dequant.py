"""Weight dequantization: fp8_block (128 x 128 block scales) and int8 per output channel."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dsv3.weights import FP8_DTYPES

from .jit_utils import TL_DTYPE, round_to
from .runtime import HP_DTYPES, QBLOCK, cdiv, check_device, check_tensor, interpreting, next_pow2, require


@triton.jit
def _dequant_kernel(
    w_ptr,
    s_ptr,
    o_ptr,
    R,
    C,
    stride_we,
    stride_wr,
    stride_se,
    stride_sr,
    stride_sc,
    stride_oe,
    stride_or,
    BLOCK_SCALED: tl.constexpr,
    QB: tl.constexpr,
    OUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    e = tl.program_id(2).to(tl.int64)
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = (r[:, None] < R) & (c[None, :] < C)
    w = tl.load(w_ptr + e * stride_we + r[:, None].to(tl.int64) * stride_wr + c[None, :], mask=mask, other=0.0)
    if BLOCK_SCALED:
        s = tl.load(
            s_ptr + e * stride_se + (r[:, None] // QB) * stride_sr + (c[None, :] // QB) * stride_sc,
            mask=mask,
            other=0.0,
        )
    else:
        s = tl.load(s_ptr + e * stride_se + r * stride_sr, mask=r < R, other=0.0)[:, None]
    out = round_to(w.to(tl.float32) * s, OUT)
    tl.store(o_ptr + e * stride_oe + r[:, None].to(tl.int64) * stride_or + c[None, :], out, mask=mask)


def dequantize_weight(data: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """data (..., out, in) fp8 or int8 with its scales -> (..., out, in) dtype.

    fmt "fp8_block": scale (..., ceil(out/128), ceil(in/128)) float32, block value = data * scale.
    fmt "int8_w8a8" / "int8_wo": scale (..., out) float32, row value = data * scale.
    """
    where = "dequantize_weight"
    require(fmt in ("fp8_block", "int8_w8a8", "int8_wo"), where, f"unknown quantized format {fmt!r}")
    require(dtype in HP_DTYPES, where, f"dtype must be float32, bfloat16 or float16, got {dtype}")
    block = fmt == "fp8_block"
    check_tensor(where, "data", data, FP8_DTYPES if block else (torch.int8,))
    require(data.dim() in (2, 3), where, f"data must be (out, in) or (E, out, in), got shape {list(data.shape)}")
    *lead, rows, cols = data.shape
    want = (*lead, cdiv(rows, QBLOCK), cdiv(cols, QBLOCK)) if block else (*lead, rows)
    check_tensor(where, "scale", scale, (torch.float32,), shape=want)
    check_device(where, data=data, scale=scale)
    data, scale = data.contiguous(), scale.contiguous()
    w3, s3 = data.reshape(-1, rows, cols), scale.reshape(-1, *scale.shape[len(lead) :])
    out = torch.empty(w3.shape, dtype=dtype, device=data.device)
    if out.numel() == 0:
        return out.view(data.shape)
    # the interpreter pays per program: whole matrices in few programs there
    br, bc = (min(512, next_pow2(rows)), min(2048, next_pow2(cols))) if interpreting() else (64, 128)
    grid = (cdiv(rows, br), cdiv(cols, bc), w3.shape[0])
    _dequant_kernel[grid](
        w3, s3, out, rows, cols, w3.stride(0), w3.stride(1), s3.stride(0), s3.stride(1),
        s3.stride(2) if block else 0, out.stride(0), out.stride(1),
        BLOCK_SCALED=block, QB=QBLOCK, OUT=TL_DTYPE[dtype], BLOCK_R=br, BLOCK_C=bc, num_warps=4,
    )  # fmt: skip
    return out.view(data.shape)
