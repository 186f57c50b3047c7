"""Tensor-parallel serving: rank 0 runs the server and the scheduler; every other rank replays its model calls.

Under torchrun each rank holds its shard of the model (``dsv3.model.parallel``), and every forward has
collectives that all ranks must enter in the same order. Rank 0 serves HTTP and schedules as in one
process, through :class:`MirroredModel`: each model call (``new_cache``, ``set_pages``, ``copy_page``,
``forward``, ``logits``, ``mtp_forward``, an MTP module's ``logits``) is first announced to the other ranks, with its tensor
arguments, then run. The other ranks sit in :func:`follow` and run the same call on their shard, so
the collectives pair up. Only rank 0 samples: the outputs every rank computes are identical
(gathered logits), and rank 0's choices reach the others as the next call's input tokens.

Messages: a JSON header (operation, integers, tensor shapes and dtypes) through
``ParallelContext.broadcast_object`` (never pickled), then each tensor by ``dist.broadcast``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from ...model.cache import ModelCache
from ...model.graph import Transformer
from ...model.parallel import ParallelContext

_DTYPES = {str(d): d for d in (torch.int64, torch.int32, torch.float32, torch.bfloat16, torch.float16)}


class MirrorBroken(BaseException):
    """A mirrored call failed on rank 0: the ranks may have stopped at different collectives.

    A BaseException on purpose: the scheduler's per-step error handling (``except Exception``) must not
    carry on with ranks out of step; the scheduler thread stops, /health reports it, requests fail.
    """


class _Channel:
    """Rank 0 -> every other rank: one header and its tensors per model call."""

    def __init__(self, par: ParallelContext, device: torch.device):
        self.par, self.device = par, device
        self.broken = False  # a send failed half-way: the other ranks may be waiting for the rest

    def send(self, op: str, ints: dict[str, Any], tensors: list[torch.Tensor | None]) -> None:
        if not self.par.distributed:  # nobody to tell
            return
        for t in tensors:
            if t is not None and str(t.dtype) not in _DTYPES:
                raise MirrorBroken(f"cannot mirror a {t.dtype} tensor to the other ranks (call {op!r})")
        header = {
            "op": op,
            "ints": ints,
            "tensors": [None if t is None else [list(t.shape), str(t.dtype)] for t in tensors],
        }
        try:
            self.par.broadcast_object(header)
            for t in tensors:
                if t is not None:
                    dist.broadcast(t.detach().to(self.par.device).contiguous(), 0, group=self.par.group)
        except Exception as exc:
            self.broken = True
            raise MirrorBroken(f"sending {op!r} to the other ranks failed: {type(exc).__name__}: {exc}") from exc

    def receive(self) -> tuple[str, dict[str, Any], list[torch.Tensor | None]]:
        header = self.par.broadcast_object(None)
        tensors: list[torch.Tensor | None] = []
        for spec in header["tensors"]:
            if spec is None:
                tensors.append(None)
                continue
            buf = torch.empty(spec[0], dtype=_DTYPES[spec[1]], device=self.par.device)
            dist.broadcast(buf, 0, group=self.par.group)
            tensors.append(buf.to(self.device))
        return header["op"], header["ints"], tensors


class _MirroredMTPHead:
    """``model.mtp[depth]`` as the speculative decoder uses it: only ``logits`` (a collective) is mirrored."""

    def __init__(self, owner: MirroredModel, depth: int):
        self.owner, self.depth = owner, depth

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.owner.channel.send("mtp_logits", {"depth": self.depth}, [hidden])
        return self.owner._run(self.owner.model.mtp[self.depth].logits, hidden)


class MirroredModel:
    """Rank 0's model for the scheduler: each call is announced to the other ranks, then run here.

    Of the wrapped model's other attributes only those that run nothing are readable (``PLAIN``): a
    submodule called directly would enter collectives the other ranks never join. Calls must come
    from one thread (the scheduler's); :meth:`close` (after the scheduler stopped) releases the
    other ranks.
    """

    PLAIN = frozenset({"cfg", "embed", "ops", "opts", "par", "backend_info"})

    def __init__(self, model: Transformer, par: ParallelContext):
        self.model = model
        self.channel = _Channel(par, model.embed.device)
        self.mtp = [_MirroredMTPHead(self, d) for d in range(len(model.mtp))]
        self._cache_ids: dict[int, int] = {}
        self._failed = False

    def __getattr__(self, name: str) -> Any:
        if name not in MirroredModel.PLAIN:
            raise AttributeError(f"MirroredModel does not mirror {name!r}: use it through a mirrored call")
        return getattr(self.model, name)

    @property
    def broken(self) -> bool:
        """A call failed or a message went half-way: the ranks may be out of step."""
        return self._failed or self.channel.broken

    def mark_broken(self) -> None:
        """Say the ranks may be out of step (e.g. the scheduler thread did not stop): close() sends nothing."""
        self._failed = True

    def _run(self, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            self._failed = True
            raise MirrorBroken(f"a tensor-parallel model call failed on rank 0: {type(exc).__name__}: {exc}") from exc

    def _cache_id(self, cache: ModelCache | None) -> int:
        return -1 if cache is None else self._cache_ids[id(cache)]

    def new_cache(
        self, max_batch: int, max_len: int, page_size: int | None = None, num_pages: int | None = None
    ) -> ModelCache:
        ints = {"max_batch": max_batch, "max_len": max_len, "page_size": page_size, "num_pages": num_pages}
        self.channel.send("new_cache", ints, [])
        cache = self._run(self.model.new_cache, max_batch, max_len, page_size=page_size, num_pages=num_pages)
        self._cache_ids[id(cache)] = len(self._cache_ids)
        return cache

    def copy_page(self, cache: ModelCache, src: int, dst: int) -> None:
        self.channel.send("copy_page", {"cache": self._cache_id(cache), "src": src, "dst": dst}, [])
        self._run(self.model.copy_page, cache, src, dst)

    def set_pages(self, cache: ModelCache, row: int, first: int, pages: list[int]) -> None:
        table = torch.tensor(pages, dtype=torch.int64)
        self.channel.send("set_pages", {"cache": self._cache_id(cache), "row": row, "first": first}, [table])
        self._run(self.model.set_pages, cache, row, first, pages)

    def __call__(self, tokens, positions=None, cache: ModelCache | None = None, rows=None) -> torch.Tensor:
        self.channel.send("forward", {"cache": self._cache_id(cache)}, [tokens, positions, rows])
        return self._run(self.model, tokens, positions, cache, rows=rows)

    forward = __call__

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        self.channel.send("logits", {}, [hidden])
        return self._run(self.model.logits, hidden)

    def mtp_forward(self, depth, hidden, next_tokens, positions, cache: ModelCache | None = None, rows=None):
        self.channel.send(
            "mtp_forward", {"depth": depth, "cache": self._cache_id(cache)}, [hidden, next_tokens, positions, rows]
        )
        return self._run(self.model.mtp_forward, depth, hidden, next_tokens, positions, cache, rows)

    def close(self) -> None:
        """Tell the other ranks to leave :func:`follow` (call once no model call can follow).

        Not after a failed call: the other ranks may be inside a collective that will never pair up,
        and a message now could match it; they end when this process does (torchrun stops the job).
        """
        if not self.broken:
            self.channel.send("stop", {}, [])


@torch.inference_mode()
def follow(model: Transformer, par: ParallelContext) -> None:
    """On ranks 1..N-1: replay rank 0's model calls on this rank's shard until it sends ``stop``."""
    channel = _Channel(par, model.embed.device)
    caches: list[ModelCache] = []
    while True:
        op, ints, tensors = channel.receive()
        cache = caches[ints["cache"]] if ints.get("cache", -1) >= 0 else None
        if op == "stop":
            return
        if op == "new_cache":
            caches.append(
                model.new_cache(
                    ints["max_batch"], ints["max_len"], page_size=ints.get("page_size"), num_pages=ints.get("num_pages")
                )
            )
        elif op == "copy_page":
            model.copy_page(cache, ints["src"], ints["dst"])
        elif op == "set_pages":
            model.set_pages(cache, ints["row"], ints["first"], tensors[0].tolist())
        elif op == "forward":
            tokens, positions, rows = tensors
            model(tokens, positions, cache, rows=rows)
        elif op == "logits":
            model.logits(tensors[0])
        elif op == "mtp_forward":
            hidden, next_tokens, positions, rows = tensors
            model.mtp_forward(ints["depth"], hidden, next_tokens, positions, cache, rows)
        elif op == "mtp_logits":
            model.mtp[ints["depth"]].logits(tensors[0])
        else:
            raise RuntimeError(f"dsv3 serve: unknown mirrored call {op!r} from rank 0")
