"""The paged latent cache: writing tokens by slot, and absorbed MLA attention through a block table.

A layer's cache is ``(P, page_size, C + R)``: the latent and the roped key of a token side by side.
Attention gathers each row's entries into the contiguous ``(B, S, C)`` / ``(B, S, R)`` layout and
runs :func:`attention.latent_attention` on them, as ``mla_latent_attention`` does: both forms share one
definition.

An FP8 cache (``--kv-cache-dtype fp8``: the cache's dtype is an fp8 dtype) holds each entry in the byte
layout of :mod:`dsv3.model.fp8_cache`: writing quantizes each token's latent per 128-value tile, reading
gathers the row's entries, dequantizes them to the compute dtype and runs the same attention.
"""

from __future__ import annotations

import torch

from dsv3.model import fp8_cache

from .attention import causal_mask, latent_attention
from .basic import _as


def paged_cache_write(cache: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache (P, page_size, C + R) in place <- concat(kv (N, C), pe (N, R)) at slot_mapping (N,); < 0: skipped.
    An fp8 cache (P, page_size, W) stores each token encoded (fp8_cache.encode_entries)."""
    keep = slot_mapping >= 0  # (N,)
    if fp8_cache.is_fp8_cache(cache):
        entries = fp8_cache.encode_entries(kv[keep], _as(pe[keep], kv.dtype), cache.dtype)  # (n, W)
    else:
        entries = torch.cat([kv, pe], dim=-1)[keep]  # (n, C + R)
    # slot = page * page_size + offset is the entry's row in the cache seen as (P * page_size, C + R)
    cache.view(-1, cache.shape[-1])[slot_mapping[keep]] = _as(entries, cache.dtype)


def gather_pages(
    cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """cache (P, page_size, D), block_table (B, M), seq_lens (B,) -> entries (B, S, D), valid (B, S) bool,
    S = M * page_size: every position the block table can name.

    Entry j of row b is ``cache[block_table[b, j // page_size], j % page_size]`` where ``valid[b, j]``
    (``j < seq_lens[b]``), else 0: the block-table entries of pages past a row's length (-1 or garbage)
    are never used as indices, and stale NaN in the rest of a row's last page stays out. S comes from the
    block table's width, not from ``max(seq_lens)``, so nothing is read back to the host: the model
    graph passes a table cut to the pages its longest row uses.
    """
    if fp8_cache.is_fp8_cache(cache):  # fp8 entries are bytes (values, scales, roped key): zeroed as bytes
        entries, valid = gather_pages(cache.view(torch.uint8), block_table, seq_lens)
        return entries.view(cache.dtype), valid
    m, page_size = block_table.shape[1], cache.shape[1]
    pages = block_table.long().clamp(0, cache.shape[0] - 1)  # a page that exists; pages past a row's end are zeroed
    entries = cache[pages].flatten(1, 2)  # (B, M * page_size, D)
    valid = torch.arange(m * page_size, device=cache.device) < seq_lens.view(-1, 1)  # (B, S)
    return entries.masked_fill(~valid.unsqueeze(-1), 0), valid  # masked_fill, not a product: NaN stays out


def mla_paged_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q_latent (B, T, H, C), q_pe (B, T, H, R), cache (P, page_size, C + R) or fp8 (P, page_size, W),
    block_table (B, M), seq_lens (B,) -> (B, T, H, C) q_latent.dtype."""
    c, t = q_latent.shape[-1], q_latent.shape[1]
    entries, valid = gather_pages(cache, block_table, seq_lens)  # (B, S, C + R) or fp8 (B, S, W), (B, S)
    if fp8_cache.is_fp8_cache(cache):  # dequantized to the compute dtype; masked entries are zero bytes: 0
        kv, pe = fp8_cache.decode_entries(entries, c, q_latent.dtype)  # (B, S, C), (B, S, R)
        entries = torch.cat([kv, pe], dim=-1)
    if t == 1:  # one new token, each row's last: it sees exactly the row's entries
        visible = valid.unsqueeze(1)  # (B, 1, S)
    else:  # the T new tokens are a row's last: query t sits at position seq_len - T + t
        q_pos = seq_lens.long().view(-1, 1) - t + torch.arange(t, device=seq_lens.device)  # (B, T)
        visible = causal_mask(q_pos, entries.shape[1])  # (B, T, S)
    return latent_attention(q_latent, q_pe, entries[..., :c], entries[..., c:], visible, scale)
