"""The KV cache of the model graph: one LayerCache per layer (MLA's compressed latent and rope key,
or full K/V) and ModelCache holding them for the main layers and the MTP layers."""

from __future__ import annotations

import torch


class LayerCache:
    """One attention layer's cache, indexed by token position.

    naive: ``k (B, S, H, Dqk)``, ``v (B, S, H, Dv)``. absorb: ``kv (B, S, C)``, ``pe (B, S, R)``.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], rows: torch.Tensor | None = None, length: int | None = None):
        self.tensors = tensors
        self.rows = rows  # (B,) int64 cache rows (slots) that batch rows 0..B-1 use; None: rows 0..B-1
        self.length = length  # entries to read back (max position + 1); None: computed per write

    def view(self, rows: torch.Tensor | None = None, length: int | None = None) -> LayerCache:
        """The same storage seen through cache rows ``rows (B,)`` (distinct; default this view's) and a read length."""
        return LayerCache(self.tensors, self.rows if rows is None else rows, length)

    def write_and_read(self, new: dict[str, torch.Tensor], positions: torch.Tensor) -> dict[str, torch.Tensor]:
        """Store ``new[name] (B, T, ...)`` at ``positions (B, T)``; return every entry up to the max position."""
        b, rows = positions.shape[0], self.rows
        index = torch.arange(b, device=positions.device) if rows is None else rows
        index = index.unsqueeze(1).expand_as(positions)  # (B, T)
        s = self.length if self.length is not None else int(positions.max()) + 1
        out = {}
        for name, value in new.items():
            buf = self.tensors[name]
            buf.index_put_((index, positions), value.to(buf.dtype))
            out[name] = buf[:b, :s] if rows is None else buf[rows, :s]  # (B, s, ...)
        return out

    def nbytes_per_token(self) -> int:
        return sum(t[0, 0].numel() * t.element_size() for t in self.tensors.values())


def cache_rows(slots: list[int], device) -> torch.Tensor | None:
    """The ``rows`` argument of ``Transformer.forward`` for batch rows living in cache rows ``slots``:
    None when they are exactly 0..B-1 (a plain slice of the cache), else the slots as int64 (B,)."""
    if slots == list(range(len(slots))):
        return None
    return torch.tensor(slots, dtype=torch.long, device=device)


class ModelCache:
    """KV caches for every main layer and MTP layer: ``main[i]``, ``mtp[j]`` (LayerCache)."""

    def __init__(self, main: list[LayerCache], mtp: list[LayerCache], max_batch: int, max_len: int):
        self.main, self.mtp, self.max_batch, self.max_len = main, mtp, max_batch, max_len

    def view(self, rows: torch.Tensor | None = None, length: int | None = None) -> ModelCache:
        """Every layer's cache seen through ``LayerCache.view(rows, length)``; same storage."""
        main = [c.view(rows, length) for c in self.main]
        return ModelCache(main, [c.view(rows, length) for c in self.mtp], self.max_batch, self.max_len)

    def nbytes_per_token(self) -> int:
        """Bytes cached per token across the main layers (what MLA saves is visible here)."""
        return sum(c.nbytes_per_token() for c in self.main)
