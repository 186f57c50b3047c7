"""The paged latent cache: writing tokens by slot, and absorbed MLA attention through a block table.

A layer's cache is ``(P, page_size, C + R)``: the latent and the roped key of a token side by side.
Attention gathers each row's entries into the contiguous ``(B, S, C)`` / ``(B, S, R)`` layout and
runs :func:`attention.mla_latent_attention` on them, so both forms share one definition.
"""

from __future__ import annotations

import torch

from .attention import mla_latent_attention


def paged_cache_write(cache: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """cache (P, page_size, C + R) in place <- concat(kv (N, C), pe (N, R)) at slot_mapping (N,); < 0: skipped."""
    page_size = cache.shape[1]
    keep = slot_mapping >= 0  # (N,)
    slots = slot_mapping[keep]  # (n,)
    entries = torch.cat([kv[keep], pe[keep]], dim=-1)  # (n, C + R)
    cache[slots // page_size, slots % page_size] = entries.to(cache.dtype)


def gather_pages(cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor) -> torch.Tensor:
    """cache (P, page_size, D), block_table (B, M), seq_lens (B,) -> (B, S, D), S = max(seq_lens).

    Entry j of row b is ``cache[block_table[b, j // page_size], j % page_size]``; entries at or past a
    row's length are 0 (what the block table holds there, -1 or garbage, is read but never used as an index).
    """
    page_size = cache.shape[1]
    s = int(seq_lens.max())
    j = torch.arange(s, device=cache.device)  # (S,) cache positions
    valid = j.view(1, s) < seq_lens.view(-1, 1).to(j.dtype)  # (B, S)
    pages = block_table[:, j // page_size].long()  # (B, S) page of each position
    pages = pages.masked_fill(~valid, 0)  # a page index that exists, for positions we then zero
    entries = cache[pages, (j % page_size).view(1, s)]  # (B, S, D)
    if bool(valid.all()):  # every row as long as the longest (a batch decoding in step): nothing to zero
        return entries
    return entries.masked_fill(~valid.unsqueeze(-1), 0)  # masked_fill, not a product: stale NaN stays out


def mla_paged_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q_latent (B, T, H, C), q_pe (B, T, H, R), cache (P, page_size, C + R), block_table (B, M),
    seq_lens (B,) -> (B, T, H, C) q_latent.dtype."""
    c, t = q_latent.shape[-1], q_latent.shape[1]
    entries = gather_pages(cache, block_table, seq_lens)  # (B, S, C + R)
    kv, pe = entries[..., :c], entries[..., c:]  # (B, S, C), (B, S, R)
    # the T new tokens are a row's last: query t sits at position seq_len - T + t
    q_pos = seq_lens.long().view(-1, 1) - t + torch.arange(t, device=seq_lens.device)  # (B, T)
    return mla_latent_attention(q_latent, q_pe, kv, pe, q_pos, scale)
