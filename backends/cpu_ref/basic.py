"""Embedding, RMSNorm, rotary embedding, SiLU-and-multiply, sampling."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.runtime.sampling import nucleus


def embedding(ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """ids (B, T) int64, weight (V, D) -> (B, T, D) weight.dtype."""
    return F.embedding(ids, weight)


def _f32(x: torch.Tensor) -> torch.Tensor:
    """x in float32: itself when it already is (``x.float()`` would still be a call per use)."""
    return x if x.dtype == torch.float32 else x.float()


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x if x.dtype == dtype else x.to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D) x.dtype, computed in float32."""
    xf = _f32(x)
    normed = xf * torch.rsqrt((xf * xf).mean(-1, keepdim=True) + eps)
    return _as(normed * _f32(weight), x.dtype)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, R), cos/sin (B, T, R/2) fp32 -> (B, T, H, R): rotate adjacent pairs (interleaved)."""
    pairs = _f32(x).unflatten(-1, (-1, 2))  # (B, T, H, R/2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)  # (B, T, 1, R/2)
    rotated = torch.stack((even * c - odd * s, odd * c + even * s), dim=-1)  # (B, T, H, R/2, 2)
    return _as(rotated.flatten(-2), x.dtype)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) -> silu(gate) * up (..., I)."""
    return F.silu(gate) * up


def sample(
    logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor, generator: torch.Generator | None
) -> torch.Tensor:
    """logits (B, V) fp32, temperature (B,), top_p (B,) -> (B,) int64.

    Temperature 0 rows take the argmax; others sample from the top-p nucleus of softmax(logits / T)
    (see ``nucleus``: a top_p that no token reaches keeps the most likely token).
    """
    greedy = logits.argmax(dim=-1)
    hot = temperature > 0
    if not bool(hot.any()):
        return greedy
    sorted_p, order = nucleus(logits, temperature, top_p)
    choice = torch.multinomial(sorted_p, 1, generator=generator).squeeze(-1)
    sampled = order.gather(-1, choice.unsqueeze(-1)).squeeze(-1)
    return torch.where(hot, sampled, greedy)
