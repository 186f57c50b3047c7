"""The example backend's operators: plain PyTorch, written differently from cpu_ref on purpose.

Signatures, shapes and dtypes are those of the hookspecs in ``dsv3.hookspecs``.
"""

from __future__ import annotations

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D) any float, weight (D,), eps -> (..., D) x.dtype; float32 inside.

    ``x / sqrt(mean(x**2) + eps) * weight`` with the mean of squares taken as ``||x||^2 / D``.
    """
    xf = x.float()
    mean_sq = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1]
    return (xf * torch.rsqrt(mean_sq + eps) * weight.float()).to(x.dtype)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) -> (..., I) gate.dtype: ``gate * sigmoid(gate) * up``, in float32 then cast back."""
    g = gate.float()
    return (g * torch.sigmoid(g) * up.float()).to(gate.dtype)


def linear_hp(x: torch.Tensor, w) -> torch.Tensor:
    """x (..., in) compute dtype, w: Weight (out, in) hp -> (..., out) x.dtype: ``x @ w.T``."""
    return torch.matmul(x, w.data.to(x.dtype).t())
