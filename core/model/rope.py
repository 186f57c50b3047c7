"""Rotary frequencies with YaRN: the tables the ``rotary`` operator consumes.

Plain arithmetic on the config, computed once per model (not per token).
"""

from __future__ import annotations

import math

import torch

from .config import ModelConfig


def _yarn_mscale(factor: float, mscale: float) -> float:
    if factor <= 1 or not mscale:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def inv_frequencies(cfg: ModelConfig) -> torch.Tensor:
    """``(R/2,) float32`` angular frequencies, YaRN-blended between interpolation and extrapolation."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    freqs = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    y = cfg.yarn
    if y is None or y.factor <= 1:
        return freqs

    def correction_dim(rotations: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high = min(math.ceil(correction_dim(y.beta_slow)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: divide it by the factor
    return freqs / y.factor * (1 - extrapolate) + freqs * extrapolate


def cos_sin_table(cfg: ModelConfig, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin: (max_positions, R/2) float32``, scaled by mscale(factor, mscale)/mscale(factor, mscale_all_dim)."""
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_frequencies(cfg))
    scale = 1.0
    if cfg.yarn is not None:
        y = cfg.yarn
        scale = _yarn_mscale(y.factor, y.mscale) / _yarn_mscale(y.factor, y.mscale_all_dim)
    return angles.cos() * scale, angles.sin() * scale
