"""Captured decode steps: one graph per batch-size bucket, replayed with the batch padded to its bucket.

A decode step is hundreds of small operations per layer; on a GPU each is a kernel launch, and at
batch 1 the launches, not the memory reads, set the speed. A backend whose ``BackendInfo.capture_graph``
is set (CUDA graphs on nvidia, HIP graphs on amd) records the step once per bucket and replays it.

How a step is made capturable (what :class:`DecodeGraphs` does):

- static inputs: token ids, positions and cache rows live in buffers of the largest bucket's size;
  each step copies the live rows into them, and the ``n`` live rows of a bucket of ``s`` are followed
  by ``s - n`` padding rows that decode token 0 at position 0 of ``pad_row``, a cache row no request
  uses (its writes land on pages only it owns, and its logits are dropped);
- no host values from the step's data: the forward gets ``length = cache.max_len``, so the attention
  block table is the cache's full width and only ``seq_lens`` (a tensor) says how far each row reads;
- one graph per bucket (:func:`capture_sizes`), captured the first time a step of that bucket runs,
  with that step's own inputs (the warm-up runs write the same cache entries the step writes).

Falls back to the eager step, with the same results: when the backend has no ``capture_graph``, when the
batch is larger than the largest bucket, under tensor parallelism (not captured yet), and for a bucket
whose capture raised (one line on stderr, then that bucket runs eagerly for good).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from ..hookspecs import CaptureGraph
from ..model.cache import ModelCache
from ..model.graph import Transformer

#: The largest bucket captured by default (vLLM's default for its CUDA graph sizes is 512; decode
#: batches past this are bandwidth-bound enough that launches no longer matter).
MAX_CAPTURE_SIZE = 256


def capture_sizes(max_batch: int, limit: int = MAX_CAPTURE_SIZE) -> tuple[int, ...]:
    """The batch sizes to capture for steps of up to ``max_batch`` rows: 1, 2, 4, 8, then every multiple
    of 8, up to the first that holds ``max_batch``, and never past ``limit`` (vLLM's ladder)."""
    if max_batch < 1 or limit < 1:
        raise ValueError(f"max_batch ({max_batch}) and limit ({limit}) must be at least 1")
    sizes: list[int] = []
    size = 1
    while size <= limit:
        sizes.append(size)
        if size >= max_batch:
            break
        size = size * 2 if size < 8 else size + 8
    return tuple(sizes)


def bucket_for(n: int, sizes: tuple[int, ...]) -> int | None:
    """The smallest size in ``sizes`` (ascending) holding ``n`` rows; None when none does."""
    return next((s for s in sizes if s >= n), None)


def backend_capture(model: Transformer, enforce_eager: bool = False) -> CaptureGraph | None:
    """The model's backend's ``BackendInfo.capture_graph``; None with ``enforce_eager`` or with several
    processes (tensor parallelism or --dp-attention: their collectives are not captured; steps stay eager)."""
    info = getattr(model, "backend_info", None)  # set by dsv3.runtime.loading.build_model
    if info is None or enforce_eager or model.opts.par.distributed:
        return None
    return info.capture_graph


class DecodeGraphs:
    """The decode step ``(tokens, positions, rows) -> logits`` of ``model`` over ``cache``, captured per bucket.

    pad_row: a cache row no request uses, for padding rows (module docstring); unused without ``capture``.
    capture: the backend's ``capture_graph`` (:func:`backend_capture`); None: every step is eager.
    max_batch: the most live rows a step has (the static buffers' size is its bucket).
    """

    def __init__(
        self,
        model: Transformer,
        cache: ModelCache,
        pad_row: int,
        max_batch: int,
        capture: CaptureGraph | None,
        warn: Callable[[str], None] | None = None,
    ):
        if capture is not None and not 0 <= pad_row < cache.max_batch:
            raise ValueError(f"pad_row {pad_row} is not a row of the cache ({cache.max_batch} rows)")
        self.model, self.cache, self.pad_row, self.capture = model, cache, pad_row, capture
        self.sizes = capture_sizes(max_batch)
        self.warn = warn or (lambda line: print(line, file=sys.stderr))
        self.graphs: dict[int, Callable[[], torch.Tensor]] = {}
        self.failed: dict[int, str] = {}
        self.replays = self.eager_steps = 0
        self._static: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    @property
    def enabled(self) -> bool:
        return self.capture is not None

    def eager(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """tokens (B,) int64, positions (B,), rows (B,) int64 or None (rows 0..B-1) -> logits (B, V) float32."""
        hidden = self.model(tokens.unsqueeze(1), positions.unsqueeze(1), self.cache, rows=rows)
        return self.model.logits(hidden[:, 0])

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        """One decode step, replayed when its bucket is captured: same arguments and result as :meth:`eager`."""
        n = tokens.shape[0]
        size = bucket_for(n, self.sizes) if self.enabled else None
        if size is None or size in self.failed:
            self.eager_steps += 1
            return self.eager(tokens, positions, rows)
        tok, pos, row = self._fill(tokens, positions, rows, size)
        graph = self.graphs.get(size)
        if graph is None:
            graph = self._capture(size, tok, pos, row)
            if graph is None:
                self.eager_steps += 1
                return self.eager(tokens, positions, rows)
        self.replays += 1
        return graph()[:n]

    def stats(self) -> dict:
        """``graph_replays``, ``eager_steps``, ``captured_buckets`` and ``failed_buckets`` so far."""
        return {
            "graph_replays": self.replays,
            "eager_steps": self.eager_steps,
            "captured_buckets": sorted(self.graphs),
            "failed_buckets": sorted(self.failed),
        }

    # ------------------------------------------------------------ internals
    def _fill(
        self, tokens: torch.Tensor, positions: torch.Tensor, rows: torch.Tensor | None, size: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copy the live rows into the static buffers, pad up to ``size``; the buffers' first ``size`` rows."""
        if self._static is None:
            dev, width = tokens.device, self.sizes[-1]
            self._static = (
                torch.zeros((width, 1), dtype=torch.long, device=dev),
                torch.zeros((width, 1), dtype=torch.long, device=dev),
                torch.full((width,), self.pad_row, dtype=torch.long, device=dev),
            )
        tok, pos, row = (t[:size] for t in self._static)
        n = tokens.shape[0]
        tok[:n, 0] = tokens
        pos[:n, 0] = positions
        if rows is None:
            torch.arange(n, out=row[:n])
        else:
            row[:n] = rows
        tok[n:], pos[n:], row[n:] = 0, 0, self.pad_row
        return tok, pos, row

    def _capture(
        self, size: int, tok: torch.Tensor, pos: torch.Tensor, row: torch.Tensor
    ) -> Callable[[], torch.Tensor] | None:
        model, cache, length = self.model, self.cache, self.cache.max_len
        model.extend_rope(length)  # the rotary tables are not regrown inside a graph

        def step() -> torch.Tensor:
            hidden = model(tok, pos, cache, rows=row, length=length)  # (size, 1, D)
            return model.logits(hidden[:, 0])  # (size, V) float32

        try:
            graph = self.capture(step)
        except Exception as exc:  # a backend's capture may fail for any reason: the eager step still works
            self.failed[size] = f"{type(exc).__name__}: {exc}"
            self.warn(f"dsv3: graph capture of decode batch {size} failed ({self.failed[size]}); it runs eagerly")
            return None
        self.graphs[size] = graph
        return graph
