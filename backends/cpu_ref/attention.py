"""MLA attention: the naive per-head form and the weight-absorbed latent form."""

from __future__ import annotations

import torch


def _causal_mask(q_pos: torch.Tensor, s: int) -> torch.Tensor:
    """q_pos (B, T) -> (B, 1, T, S) bool, True where key j <= query position."""
    keys = torch.arange(s, device=q_pos.device)
    return (keys.view(1, 1, s) <= q_pos.unsqueeze(-1)).unsqueeze(1)


def _past_rows_zeroed(x: torch.Tensor, q_pos: torch.Tensor) -> torch.Tensor:
    """x (B, S, ...) with entries past each row's largest query position set to 0.

    Those keys are masked, but ``0 * x`` is NaN where a reused cache slot holds a stale NaN/inf.
    """
    keep = torch.arange(x.shape[1], device=x.device) <= q_pos.amax(dim=1, keepdim=True)  # (B, S)
    return x.masked_fill(~keep.view(*keep.shape, *([1] * (x.dim() - 2))), 0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor, scale: float) -> torch.Tensor:
    """q (B, T, H, Dqk), k (B, S, H, Dqk), v (B, S, H, Dv), q_pos (B, T) -> (B, T, H, Dv) q.dtype."""
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) * scale  # (B, H, T, S)
    scores = scores.masked_fill(~_causal_mask(q_pos, k.shape[1]), float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bhts,bshd->bthd", probs, _past_rows_zeroed(v.float(), q_pos)).to(q.dtype)


def mla_latent_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    pe: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q_latent (B, T, H, C), q_pe (B, T, H, R), kv (B, S, C), pe (B, S, R), q_pos (B, T) -> (B, T, H, C)."""
    scores = torch.einsum("bthc,bsc->bhts", q_latent.float(), kv.float())
    scores = scores + torch.einsum("bthr,bsr->bhts", q_pe.float(), pe.float())
    scores = (scores * scale).masked_fill(~_causal_mask(q_pos, kv.shape[1]), float("-inf"))
    probs = scores.softmax(dim=-1)  # (B, H, T, S)
    return torch.einsum("bhts,bsc->bthc", probs, _past_rows_zeroed(kv.float(), q_pos)).to(q_latent.dtype)
