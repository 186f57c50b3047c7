"""RMSNorm, interleaved rotary embedding and SwiGLU through torch_npu's fused operators.

Each ``*_with(tn)`` binds an implementation to the torch_npu module ``tn`` once, at op resolution;
signatures are the hooks' (see dsv3.hookspecs).
"""

from __future__ import annotations

import torch


def rms_norm_with(tn):
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """x (..., D) fp16/bf16/fp32 with 2..8 dims, weight (D,) -> (..., D) x.dtype.

        ``torch_npu.npu_rms_norm(self, gamma, epsilon) -> (y, rstd)``; gamma must have x's dtype.
        """
        return tn.npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]

    return rms_norm


def rotary_with(tn):
    def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, H, R), cos/sin (B, T, R/2) fp32 -> (B, T, H, R) x.dtype, adjacent pairs rotated.

        ``torch_npu.npu_rotary_mul(input, r1, r2, rotary_mode="interleave")`` computes
        ``r1 * x + r2 * rotate(x)`` with ``rotate`` taking each pair (a, b) to (-b, a): the
        interleaved RoPE when r1/r2 repeat each frequency's cos/sin twice. Its interleave mode takes
        r1/r2 as ``(1, S, 1, D)`` for a BSND input, one row of angles per sequence position; rows of
        a batch sit at different positions, so the batch is folded into S: x becomes
        ``(1, B*T, H, R)``. Computed in float32 as the contract asks.
        """
        b, t, h, r = x.shape
        xf = x.float().reshape(1, b * t, h, r)  # (1, S=B*T, N=H, D=R)
        r1 = cos.float().repeat_interleave(2, dim=-1).reshape(1, b * t, 1, r)  # (1, S, 1, D)
        r2 = sin.float().repeat_interleave(2, dim=-1).reshape(1, b * t, 1, r)
        out = tn.npu_rotary_mul(xf, r1, r2, rotary_mode="interleave")  # (1, S, H, R)
        return out.reshape(b, t, h, r).to(x.dtype)

    return rotary


def silu_and_mul_with(tn):
    def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """gate, up (..., I) -> silu(gate) * up (..., I).

        ``torch_npu.npu_swiglu(input, dim=-1)`` splits input in halves A, B along dim and returns
        ``silu(A) * B``; the halves are concatenated first (one copy of the activations).
        """
        return tn.npu_swiglu(torch.cat([gate, up], dim=-1), dim=-1)

    return silu_and_mul
