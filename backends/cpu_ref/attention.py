"""MLA attention: the naive per-head form and the weight-absorbed latent form."""

from __future__ import annotations

import torch

from .basic import _as, _f32


def causal_mask(q_pos: torch.Tensor, s: int) -> torch.Tensor:
    """q_pos (B, T) -> (B, T, S) bool, True where key j <= query position."""
    keys = torch.arange(s, device=q_pos.device)
    return keys <= q_pos.unsqueeze(-1)


def _past_rows_zeroed(x: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """x (B, S, ...) with the entries no query sees (``visible (B, T, S)`` False for every t) set to 0.

    Those keys are masked, but ``0 * x`` is NaN where a reused cache slot holds a stale NaN/inf.
    """
    keep = visible.any(dim=1)  # (B, S)
    return x.masked_fill(~keep.view(*keep.shape, *([1] * (x.dim() - 2))), 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, T, H, Dqk), k (B, S, H, Dqk), v (B, S, H, Dv), q_pos (B, T) -> (B, T, H, Dv) q.dtype."""
    visible = causal_mask(q_pos, k.shape[1])  # (B, T, S)
    scores = torch.einsum("bthd,bshd->bhts", _f32(q), _f32(k)) * scale  # (B, H, T, S)
    scores = scores.masked_fill(~visible.unsqueeze(1), float("-inf"))
    probs = scores.softmax(dim=-1)
    return _as(torch.einsum("bhts,bshd->bthd", probs, _past_rows_zeroed(_f32(v), visible)), q.dtype)


def latent_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    pe: torch.Tensor,
    visible: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The absorbed form given its mask: q_latent (B, T, H, C), q_pe (B, T, H, R), kv (B, S, C), pe (B, S, R),
    visible (B, T, S) bool (True: query t may see key j) -> (B, T, H, C) q_latent.dtype.

    Entries of kv no query sees must be finite (zeros): they are multiplied by a probability of 0.
    Scores are two products (latent part, roped part), summed, scaled, masked; softmax in float32.
    """
    kv32 = _f32(kv).unsqueeze(1)  # (B, 1, S, C): one latent "head" shared by every query head
    pe32 = _f32(pe).unsqueeze(1)  # (B, 1, S, R)
    scores = _f32(q_latent) @ kv32.transpose(-1, -2) + _f32(q_pe) @ pe32.transpose(-1, -2)  # (B, T, H, S)
    scores = (scores * scale).masked_fill(~visible.unsqueeze(2), float("-inf"))
    return _as(scores.softmax(dim=-1) @ kv32, q_latent.dtype)  # (B, T, H, C)


def mla_latent_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    pe: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q_latent (B, T, H, C), q_pe (B, T, H, R), kv (B, S, C), pe (B, S, R), q_pos (B, T) -> (B, T, H, C)."""
    visible = causal_mask(q_pos, kv.shape[1])  # (B, T, S)
    return latent_attention(q_latent, q_pe, _past_rows_zeroed(kv, visible), pe, visible, scale)
