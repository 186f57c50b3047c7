"""The KV cache of the model graph: one cache per layer and ModelCache holding them for the main
layers and the MTP layers.

The absorbed MLA form keeps a paged latent cache (:class:`PagedLayerCache`: pages of
``(page_size, C + R)`` entries, reached through ModelCache's block table) which the graph writes with
``paged_cache_write`` and reads with ``mla_paged_attention``. The naive form keeps per-head K/V in
contiguous strips (:class:`LayerCache`), as does the ONNX export's functional stand-in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import fp8_cache


class LayerCache:
    """One naive-form attention layer's cache, contiguous and indexed by token position.

    ``k (B, S, H, Dqk)``, ``v (B, S, H, Dv)`` (any names: ``write_and_read`` stores what it is given).
    """

    paged = False

    def __init__(self, tensors: dict[str, torch.Tensor], rows: torch.Tensor | None = None, length: int | None = None):
        self.tensors = tensors
        self.rows = rows  # (B,) int64 cache rows (slots) that batch rows 0..B-1 use; None: rows 0..B-1
        self.length = length  # entries to read back (max position + 1); None: computed per write

    def view(
        self, rows: torch.Tensor | None = None, length: int | None = None, step: PagedStep | None = None
    ) -> LayerCache:
        """The same storage seen through cache rows ``rows (B,)`` (distinct; default this view's) and a
        read length (``step`` is for paged layers: unused here)."""
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

    def entries(self, rows: torch.Tensor | list[int] | None = None) -> dict[str, torch.Tensor]:
        """Every position of cache rows ``rows`` (default all): ``name -> (B, max_len, ...)`` (views)."""
        return dict(self.tensors) if rows is None else {k: t[rows] for k, t in self.tensors.items()}

    def nbytes_per_token(self) -> int:
        return sum(t[0, 0].numel() * t.element_size() for t in self.tensors.values())


@dataclass(frozen=True)
class PagedStep:
    """What one forward's paged-cache calls need, computed once per forward for every layer.

    slot_mapping (B*T,) int64: where each new token goes (-1: a repeated position, written once).
    block_table (B', M) int32, seq_lens (B',) int32: mla_paged_attention's rows; B' = B when every
    row's positions are consecutive (the T new tokens are its last), else B*T rows of one query each.
    rows_table (B, M) int64: the batch rows' pages, for reading entries back (``gather``).
    """

    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    rows_table: torch.Tensor
    per_token: bool


class PagedLayerCache:
    """One absorbed-MLA layer's paged latent cache: ``tensors["latent"] (P, page_size, C + R)`` in the
    compute dtype, or ``(P, page_size, W)`` of an fp8 dtype in the layout of :mod:`dsv3.model.fp8_cache`.

    Token position j of cache row r lives in page ``block_table[r, j // page_size]`` at offset
    ``j % page_size`` (the block table is ModelCache's, shared by every layer); ``step`` is set on the
    per-forward views the graph gets. dtype: the compute dtype (what ``gather`` and ``entries`` return).
    """

    paged = True

    def __init__(
        self,
        pages: torch.Tensor,
        kv_dim: int,
        step: PagedStep | None = None,
        length: int | None = None,
        dtype: torch.dtype | None = None,
    ):
        self.tensors = {"latent": pages}
        self.kv_dim = kv_dim  # C: the latent's width; the rest of an entry is the roped key
        self.step = step
        self.length = length
        self.dtype = pages.dtype if dtype is None else dtype

    def _split(self, e: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """entries (..., C + R) or fp8 (..., W) -> latent (..., C), roped key (..., R) in the compute dtype."""
        if fp8_cache.is_fp8_cache(e):
            return fp8_cache.decode_entries(e, self.kv_dim, self.dtype)
        return e[..., : self.kv_dim], e[..., self.kv_dim :]

    @property
    def pages(self) -> torch.Tensor:
        return self.tensors["latent"]

    def view(
        self, rows: torch.Tensor | None = None, length: int | None = None, step: PagedStep | None = None
    ) -> PagedLayerCache:
        """The same pages for one forward: ``step`` (computed from ``rows`` by ModelCache.view) and a read length."""
        return PagedLayerCache(self.pages, self.kv_dim, step, length, self.dtype)

    def gather(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch rows' first ``length`` positions: latent (B, S, C), roped key (B, S, R) (copies)."""
        page_size = self.pages.shape[1]
        j = torch.arange(length, device=self.pages.device)  # (S,)
        entries = self.pages[self.step.rows_table[:, j // page_size], j % page_size]  # (B, S, C + R) or (B, S, W)
        return self._split(entries)

    def entries(self, rows: torch.Tensor | list[int] | None, table: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every position of cache rows ``rows`` (default all) through the block table ``table (max_batch, M)``:
        ``{"kv": (B, M * page_size, C), "pe": (B, M * page_size, R)}`` (copies)."""
        table = table if rows is None else table[rows]
        page_size, m = self.pages.shape[1], table.shape[1]
        j = torch.arange(m * page_size, device=self.pages.device)
        kv, pe = self._split(self.pages[table[:, j // page_size].long(), j % page_size])
        return {"kv": kv, "pe": pe}

    def nbytes_per_token(self) -> int:
        return self.pages[0, 0].numel() * self.pages.element_size()


def contiguous_cache(model, max_batch: int, max_len: int) -> ModelCache:
    """``model``'s caches as contiguous strips per layer (``kv (B, S, C)``, ``pe (B, S, R)`` for the absorbed
    form), zeros in the compute dtype: the layout before paging, kept as the reference that tests and
    scripts/paged_gather_bench.py compare the paged cache with. ``Transformer.new_cache`` is the cache to use."""

    def alloc(attn) -> LayerCache:
        shapes, dt, dev = attn.cache_shapes(), model.embed.dtype, model.embed.device
        return LayerCache({k: torch.zeros((max_batch, max_len, *s), dtype=dt, device=dev) for k, s in shapes.items()})

    return ModelCache(
        [alloc(b.attn) for b in model.layers], [alloc(m.block.attn) for m in model.mtp], max_batch, max_len
    )


def cache_rows(slots: list[int], device) -> torch.Tensor | None:
    """The ``rows`` argument of ``Transformer.forward`` for batch rows living in cache rows ``slots``:
    None when they are exactly 0..B-1 (a plain slice of the cache), else the slots as int64 (B,)."""
    if slots == list(range(len(slots))):
        return None
    return torch.tensor(slots, dtype=torch.long, device=device)


def page_table(max_batch: int, max_len: int, page_size: int, seed: int, device) -> torch.Tensor:
    """(max_batch, ceil(max_len / page_size)) int32: each cache row's own pages, drawn from a pool
    shuffled with ``seed`` (so rows' pages are not contiguous), ``max_batch * M`` pages in all."""
    m = -(-max_len // page_size)
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(max_batch * m, generator=gen).view(max_batch, m).to(device=device, dtype=torch.int32)


def paged_step(
    table: torch.Tensor, page_size: int, positions: torch.Tensor, rows: torch.Tensor | None, length: int | None = None
) -> PagedStep:
    """The slot mapping and attention rows for new tokens at ``positions (B, T)`` of cache rows ``rows``.

    length: the largest position + 1, when known on the host: the attention block table then lists only
    the ``ceil(length / page_size)`` pages a row can use (what an attention kernel reads need not depend
    on the cache's full width).
    """
    b, t = positions.shape
    rows_table = (table[:b] if rows is None else table[rows]).long()  # (B, M)
    pos = positions.long()
    slots = rows_table.gather(1, pos // page_size) * page_size + pos % page_size  # (B, T)
    if t > 1:  # a repeated position (callers repeat one to pad a short row) is written once: slots distinct
        ordered, order = pos.sort(dim=1, stable=True)
        repeat = torch.zeros_like(ordered, dtype=torch.bool)
        repeat[:, :-1] = ordered[:, :-1] == ordered[:, 1:]
        slots = slots.masked_fill(torch.empty_like(repeat).scatter_(1, order, repeat), -1)
    steps = torch.arange(t, device=pos.device) - (t - 1)
    consecutive = t == 1 or bool((pos == pos[:, -1:] + steps).all())  # the T new tokens are each row's last
    attend_table = rows_table if length is None else rows_table[:, : -(-length // page_size)]
    if consecutive:
        table_rows, seq_lens = attend_table, pos[:, -1] + 1
    else:  # one attention row per query, each seeing keys up to its own position
        table_rows, seq_lens = attend_table.repeat_interleave(t, dim=0), pos.flatten() + 1
    return PagedStep(slots.flatten(), table_rows.int(), seq_lens.int(), rows_table, not consecutive)


class ModelCache:
    """KV caches for every main layer and MTP layer: ``main[i]``, ``mtp[j]``.

    block_table (max_batch, M) int32 (paged layers only, else None): cache row r's pages, the same
    page indices in every layer's page tensor; page_size entries per page.
    """

    def __init__(
        self,
        main: list,
        mtp: list,
        max_batch: int,
        max_len: int,
        block_table: torch.Tensor | None = None,
        page_size: int = 0,
    ):
        self.main, self.mtp, self.max_batch, self.max_len = main, mtp, max_batch, max_len
        self.block_table, self.page_size = block_table, page_size

    def view(
        self, rows: torch.Tensor | None = None, length: int | None = None, positions: torch.Tensor | None = None
    ) -> ModelCache:
        """Every layer's cache seen through cache rows ``rows`` and a read length, for new tokens at
        ``positions (B, T)`` (needed by paged layers); same storage."""
        step = None
        if self.block_table is not None and positions is not None:
            step = paged_step(self.block_table, self.page_size, positions, rows, length)
        main = [c.view(rows, length, step) for c in self.main]
        mtp = [c.view(rows, length, step) for c in self.mtp]
        return ModelCache(main, mtp, self.max_batch, self.max_len, self.block_table, self.page_size)

    def set_pages(self, row: int, first: int, pages: list[int]) -> None:
        """Block table entries ``first ..`` of cache row ``row`` become ``pages`` (page indices of every
        layer). A no-op for unpaged caches (the naive form's rows are contiguous)."""
        if self.block_table is None or not pages:
            return
        if first + len(pages) > self.block_table.shape[1]:
            raise ValueError(
                f"row {row}: pages {first}..{first + len(pages) - 1} past the block table's {self.block_table.shape[1]}"
            )
        self.block_table[row, first : first + len(pages)] = torch.tensor(pages, dtype=torch.int32)

    def copy_page(self, src: int, dst: int) -> None:
        """Page ``dst`` of every paged layer becomes a copy of page ``src`` (a fork's own partial page)."""
        for layer in self.main + self.mtp:
            if layer.paged:
                layer.pages[dst] = layer.pages[src]

    def entries(self, layer, rows: torch.Tensor | list[int] | None = None) -> dict[str, torch.Tensor]:
        """``layer`` (one of ``main``/``mtp``)'s entries of cache rows ``rows`` as contiguous
        ``(B, max_len, ...)`` tensors, whichever the layout (to compare caches in tests)."""
        if not layer.paged:
            return layer.entries(rows)
        return {k: t[:, : self.max_len] for k, t in layer.entries(rows, self.block_table).items()}

    def nbytes_per_token(self) -> int:
        """Bytes cached per token across the main layers (what MLA saves is visible here)."""
        return sum(c.nbytes_per_token() for c in self.main)
