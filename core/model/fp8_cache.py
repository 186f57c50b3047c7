"""The FP8 paged latent cache (``--kv-cache-dtype fp8``): its byte layout, and how an entry is
encoded and decoded, in plain PyTorch.

One tensor per layer, ``(P, page_size, W)`` of dtype ``float8_e4m3fn`` (or ``float8_e4m3fnuz`` on a
backend that declares it: MI300). Its dtype names the encoding of the latent bytes; each entry of W
bytes holds one token::

    bytes [0, C)                 C latent values, fp8 (the cache's dtype)
    bytes [C, C + 4*G)           G = ceil(C / 128) float32 scales, scale g for latent values [128g, 128g + 128)
    bytes [C + 4*G, W)           R roped-key values in the compute dtype (bfloat16: 2*R bytes, float32: 4*R)

W = C + 4*G + R * itemsize(compute dtype): 656 bytes at the 671B shape in bfloat16 (C 512, R 64), the
layout of FlashMLA's FP8 cache, against 1152 for the bfloat16 cache. C must be a multiple of 4 so the
scales are 4-byte aligned (a kernel reads them as float32).

Why this layout: the latent (C values) is 8/9 of an entry and tolerates fp8 (it is read through a
softmax average and a projection); the roped key is small and carries positions, whose rotation
angles e4m3's 3 mantissa bits would blur, so it stays exact. One scale per 128 values bounds the error
of each value by its own tile's largest (relative rounding 2^-4 of that amax) at 4 bytes per 128
values, and 128 is the activation-quantization group of the fp8_block format, so a kernel may reuse
its tiling. Scales are amax / fp8 max (448; 240 for e4m3fnuz), amax floored at 1e-4 like activations
(an all-zero tile stores zeros with a tiny scale); a tile holding NaN or +-inf stores a NaN scale, so
every value of that tile reads back NaN (never silently finite).
"""

from __future__ import annotations

import torch

from ..errors import Dsv3Error
from ..weights import AMAX_FLOOR, FP8_DTYPES, FP8_MAX

#: Latent values per scale.
TILE = 128
#: The values of ``--kv-cache-dtype``: ``auto`` = the compute dtype, ``fp8`` = the layout above.
KV_CACHE_DTYPES = ("auto", "fp8")


def is_fp8_cache(cache: torch.Tensor) -> bool:
    """Whether a paged latent cache tensor has the FP8 layout (its dtype is an fp8 dtype)."""
    return cache.dtype in FP8_DTYPES


def num_tiles(c: int) -> int:
    """Scales per entry for a latent of C values."""
    return -(-c // TILE)


def entry_bytes(c: int, r: int, dtype: torch.dtype) -> int:
    """W: bytes per token per layer of the FP8 cache for latent C, roped key R, compute dtype ``dtype``."""
    if c % 4:
        raise Dsv3Error(f"kv_lora_rank {c}: the fp8 latent cache needs a multiple of 4 (float32 scales are aligned)")
    return c + 4 * num_tiles(c) + r * torch.empty((), dtype=dtype).element_size()


def scales_view(cache: torch.Tensor, c: int) -> torch.Tensor:
    """(P, page_size, G) float32 view of every entry's scales (shares the cache's storage)."""
    g = num_tiles(c)
    return cache.view(torch.uint8)[..., c : c + 4 * g].view(torch.float32)


def rope_view(cache: torch.Tensor, c: int, dtype: torch.dtype) -> torch.Tensor:
    """(P, page_size, R) ``dtype`` view of every entry's roped key (shares the cache's storage)."""
    return cache.view(torch.uint8)[..., c + 4 * num_tiles(c) :].view(dtype)


def quantize_latent(kv: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """kv (N, C) float -> (q (N, C) fp8_dtype, scales (N, G) float32), kv ~= q * scale per 128-value tile.

    s = max(amax, 1e-4) / fp8 max per tile, q = round-to-nearest-even(kv / s) (|kv / s| <= fp8 max);
    a tile with a NaN or an infinity gets s = NaN (all of its values read back NaN).
    """
    n, c = kv.shape
    g = num_tiles(c)
    x = kv.float()
    padded = torch.nn.functional.pad(x, (0, g * TILE - c)).view(n, g, TILE)  # (N, G, 128), pad zeros
    amax = padded.abs().amax(-1)  # (N, G); NaN propagates, inf stays inf
    finite = torch.isfinite(amax)  # (N, G)
    nan = torch.tensor(float("nan"))  # a positive quiet NaN: one byte for NaN (0x7f e4m3fn, 0x80 e4m3fnuz)
    s = torch.where(finite, amax.clamp_min(AMAX_FLOOR) / FP8_MAX[fp8_dtype], nan)
    mx = FP8_MAX[fp8_dtype]
    y = (padded / s.unsqueeze(-1)).clamp(-mx, mx)  # the clamp is a no-op up to division rounding (|y| <= max)
    y = torch.where(finite.unsqueeze(-1), y, nan)  # the sign of a NaN from arithmetic varies: set it
    return y.view(n, g * TILE)[:, :c].to(fp8_dtype), s


def dequantize_latent(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """q (..., C) fp8, scales (..., G) float32 -> (..., C) float32 = q * its tile's scale."""
    c = q.shape[-1]
    per_value = scales.repeat_interleave(TILE, dim=-1)[..., :c]  # (..., C)
    return q.float() * per_value


def encode_entries(kv: torch.Tensor, pe: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """kv (N, C), pe (N, R) compute dtype -> (N, W) fp8_dtype entries in the layout above."""
    if kv.shape[0] == 0:  # (a dtype view of an empty tensor is refused)
        return torch.empty((0, entry_bytes(kv.shape[1], pe.shape[1], pe.dtype)), dtype=fp8_dtype, device=kv.device)
    q, s = quantize_latent(kv, fp8_dtype)
    parts = [q.view(torch.uint8), s.view(torch.uint8), pe.contiguous().view(torch.uint8)]
    return torch.cat(parts, dim=-1).view(fp8_dtype)


def decode_entries(entries: torch.Tensor, c: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """entries (..., W) fp8 -> (latent (..., C) ``dtype`` dequantized, roped key (..., R) ``dtype``)."""
    g = num_tiles(c)
    raw = entries.contiguous().view(torch.uint8)
    q = raw[..., :c].view(entries.dtype)
    s = raw[..., c : c + 4 * g].contiguous().view(torch.float32)
    pe = raw[..., c + 4 * g :].contiguous().view(dtype)
    return dequantize_latent(q, s).to(dtype), pe
