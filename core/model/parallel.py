"""Tensor and expert parallelism over torch.distributed: the context passed to the model build.

No globals: a :class:`ParallelContext` (rank, world size, process group) travels in
``BuildOptions.parallel``; ``None`` or a world of 1 is the single-process model, bit for bit.

How the model is split (as in DeepSeek's inference demo), ``ws`` = world size:

- attention: heads split across ranks; ``wq``/``wq_b`` and ``wkv_b`` are column-parallel (each rank
  holds its heads' output rows), ``wo`` row-parallel (its heads' input columns) + all-reduce;
  ``wq_a``, ``wkv_a`` and their norms are replicated. The naive K/V cache holds the local heads;
  the absorbed latent cache (per token, not per head) is replicated.
- dense MLPs and shared experts: ``w1``/``w3`` column-parallel, ``w2`` row-parallel + all-reduce.
- routed experts: rank r holds experts ``[r E/ws, (r+1) E/ws)``; the gate is replicated, every rank
  runs its experts for all tokens, and one all-reduce per MoE layer sums them with the shared-expert
  partial sums.
- embedding: vocab-parallel (rows ``[r V/ws, (r+1) V/ws)``; other ids give zeros; all-reduce).
- output heads (main and MTP): column-parallel over the vocabulary + all-gather of the logits, so
  every rank holds the same full logits and samples the same tokens.

Sharding is a transform applied at load: :func:`shard_dim` says which dimension of a tensor is split
and :func:`local_range` which part of the checkpoint tensor a rank reads.

With ``dp_attention`` (``--dp-attention``, docs/parallel.md) only the routed experts are split (as
above); everything else is replicated and each rank runs its own requests over its own cache; the
MoE layers move routed tokens to their experts' ranks with all-to-all (``dsv3.model.ep_comm``).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from ..errors import Dsv3Error
from ..weights import FP8_BLOCK, FP8_BLOCK_SIZE
from .config import ModelConfig


@dataclass(frozen=True)
class ParallelContext:
    """This process's place in a group of ``world_size`` processes; collectives are no-ops at world 1.

    device: where small control tensors (broadcast lengths and bytes) live; NCCL/HCCL need the
        compute device, gloo the CPU.
    owns_group: whether :meth:`close` should destroy the default process group (set by
        :func:`init_from_env` when it created it).
    dp_attention: data-parallel attention + expert parallelism: only routed experts are split over
        the ranks; the modules that tensor parallelism splits see :attr:`tp`, a world of one.
    """

    rank: int = 0
    world_size: int = 1
    group: Any = None
    device: str = "cpu"
    owns_group: bool = False
    dp_attention: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def tp(self) -> ParallelContext:
        """The context of the tensor-parallel parts (attention, dense MLPs, shared experts, embeddings,
        heads): this one, or a single process (replicated weights, no collective) under ``dp_attention``."""
        return ParallelContext(device=self.device) if self.dp_attention else self

    @property
    def expert_parallel(self) -> bool:
        """Whether MoE layers dispatch tokens to their experts' ranks (``dp_attention`` on several ranks)."""
        return self.dp_attention and self.world_size > 1

    # ------------------------------------------------------------ collectives
    def all_reduce_(self, x: torch.Tensor) -> torch.Tensor:
        """Sum ``x`` over ranks in place (any shape and float dtype); returns ``x``."""
        if self.world_size == 1:
            return x
        if x.is_contiguous():
            dist.all_reduce(x, group=self.group)
        else:
            y = x.contiguous()
            dist.all_reduce(y, group=self.group)
            x.copy_(y)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., N) on each rank -> (..., ws * N), rank r's part at ``[r N, (r+1) N)``."""
        if self.world_size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank. JSON values only (str, numbers, lists, dicts, None):
        they travel as UTF-8 bytes, never pickled."""
        if self.world_size == 1:
            return obj
        data = json.dumps(obj).encode() if self.rank == src else b""
        n = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(n, src, group=self.group)
        if self.rank == src:
            buf = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        else:
            buf = torch.empty(int(n), dtype=torch.uint8, device=self.device)
        dist.broadcast(buf, src, group=self.group)
        return obj if self.rank == src else json.loads(buf.cpu().numpy().tobytes().decode())

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (JSON values only, as :meth:`broadcast_object`), in rank order."""
        if self.world_size == 1:
            return [obj]
        return [self.broadcast_object(obj if r == self.rank else None, src=r) for r in range(self.world_size)]

    def on_rank0(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only (reading a file or the terminal) and return its JSON result on
        every rank; a Dsv3Error raised there is raised on every rank, so all stop together."""
        if self.world_size == 1:
            return fn()
        payload = None
        if self.rank == 0:
            try:
                payload = {"ok": fn()}
            except Dsv3Error as exc:
                payload = {"error": str(exc)}
        payload = self.broadcast_object(payload)
        if "error" in payload:
            raise Dsv3Error(payload["error"])
        return payload["ok"]

    def close(self) -> None:
        """Destroy the process group this context created (a no-op otherwise)."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------ layout
    def local(self, n: int) -> tuple[int, int]:
        """``(start, stop)`` of this rank's equal part of ``n`` items (``n`` divisible by the world size)."""
        size = n // self.world_size
        return self.rank * size, (self.rank + 1) * size


def vocab_parallel_embedding(
    embedding: Callable, ids: torch.Tensor, weight: torch.Tensor, par: ParallelContext | None
) -> torch.Tensor:
    """ids (B, T) int64, weight (V/ws, D) this rank's rows -> (B, T, D), summed over ranks.

    ``embedding`` is the backend's op. Ids outside this rank's rows look up row 0 and are zeroed, so
    the all-reduce adds exactly one non-zero row per token.
    """
    if par is None or par.world_size == 1:
        return embedding(ids, weight)
    start = par.rank * weight.shape[0]
    local = ids - start
    outside = (local < 0) | (local >= weight.shape[0])  # (B, T)
    x = embedding(local.masked_fill(outside, 0), weight)  # (B, T, D)
    x = x.masked_fill(outside.unsqueeze(-1), 0)
    return par.all_reduce_(x)


# ---------------------------------------------------------------- sharding at load
_COLUMN = re.compile(r"(.+\.)?(embed|head\.weight)|.+\.attn\.(wq|wq_b|wkv_b)\.\w+|.+\.ffn\.(shared\.)?(w1|w3)\.\w+")
_ROW = re.compile(r".+\.attn\.wo\.\w+|.+\.ffn\.(shared\.)?w2\.\w+")


def shard_dim(name: str) -> int | None:
    """Which dimension of the model tensor ``name`` is split across ranks: 0 (output rows: column-parallel
    linears, vocab rows), 1 (input columns: row-parallel linears) or None (replicated).

    Routed experts (``layers.N.ffn.w1.weight`` in a MoE layer) are split by expert instead; the loader
    handles them before asking this.
    """
    if _COLUMN.fullmatch(name):
        return 0
    if _ROW.fullmatch(name):
        return 1
    return None


def local_range(
    name: str, hf: str, full: tuple[int, ...], par: ParallelContext, weight_size: int | None = None
) -> tuple[int, int, int] | None:
    """``(dim, start, stop)`` of checkpoint tensor ``hf`` (model tensor ``name``, full shape ``full``)
    that this rank reads, or None for the whole tensor.

    Scales follow their weight: an fp8 block scale (2-D, one row/column per 128 weight rows/columns,
    ``weight_size`` = the weight's full size along the split dimension) is cut on block boundaries,
    and a Dsv3Error names the tensor if the split falls inside a block; a per-channel int8 scale
    ``(out,)`` is cut with the rows and kept whole for a column split.
    """
    dim = shard_dim(name)
    if par.world_size == 1 or dim is None or par.dp_attention:  # dp_attention: replicated
        return None
    ws = par.world_size
    if name.endswith(".scale"):
        if len(full) == 1:  # int8 per-output-channel scale
            return (0, *par.local(full[0])) if dim == 0 else None
        local = weight_size // ws
        if weight_size % ws or local % FP8_BLOCK_SIZE:
            raise Dsv3Error(
                f"{hf}: FP8 block scales cannot be split over {ws} ranks: {weight_size} "
                f"{'rows' if dim == 0 else 'columns'} / {ws} = {weight_size / ws:g} per rank is not a multiple "
                f"of {FP8_BLOCK_SIZE}"
            )
        blocks = local // FP8_BLOCK_SIZE
        return dim, par.rank * blocks, (par.rank + 1) * blocks
    if full[dim] % ws:
        raise Dsv3Error(f"{hf}: dimension {dim} ({full[dim]}) is not divisible by the world size {ws}")
    return (dim, *par.local(full[dim]))


def split_linears(cfg: ModelConfig, world_size: int) -> list[tuple[str, int, int]]:
    """Every split linear as ``(module path, split dim, size per rank)`` (routed experts excluded)."""
    ws = world_size
    h = cfg.num_attention_heads // ws
    prefixes = [(f"layers.{i}", i) for i in range(cfg.num_hidden_layers)]
    prefixes += [(f"mtp.{j}.block", cfg.num_hidden_layers + j) for j in range(cfg.num_nextn_predict_layers)]
    out = []
    for prefix, layer in prefixes:
        a = f"{prefix}.attn"
        out.append((f"{a}.wq_b" if cfg.q_lora_rank else f"{a}.wq", 0, h * cfg.qk_head_dim))
        out.append((f"{a}.wkv_b", 0, h * (cfg.qk_nope_head_dim + cfg.v_head_dim)))
        out.append((f"{a}.wo", 1, h * cfg.v_head_dim))
        if cfg.is_moe_layer(layer):
            if not cfg.n_shared_experts:
                continue
            f, inter = f"{prefix}.ffn.shared", cfg.n_shared_experts * cfg.moe_intermediate_size
        else:
            f, inter = f"{prefix}.ffn", cfg.intermediate_size
        out += [(f"{f}.w1", 0, inter // ws), (f"{f}.w3", 0, inter // ws), (f"{f}.w2", 1, inter // ws)]
    return out


def check_layout(
    cfg: ModelConfig, world_size: int, fmt_of: Callable[[str], str] | None = None, dp_attention: bool = False
) -> None:
    """A Dsv3Error, before any weight is read, for a model that cannot be split over ``world_size`` ranks.

    dp_attention: only the routed experts are split; they must exist and divide by the world size.

    Heads, routed experts, the vocabulary (not padded: every published vocabulary divides by the
    usual world sizes) and the dense/shared-expert intermediate sizes must divide by the world size;
    an fp8 block-scaled linear must be split on 128-row/column block boundaries.
    """
    ws = world_size
    if ws < 1:
        raise Dsv3Error(f"world size must be positive, got {ws}")
    if ws == 1:
        return
    src = cfg.source
    if dp_attention:
        if not cfg.n_routed_experts:
            raise Dsv3Error(f"{src}: --dp-attention splits routed experts over ranks, but the model has none")
        if cfg.n_routed_experts % ws:
            raise Dsv3Error(
                f"{src}: --dp-attention: n_routed_experts ({cfg.n_routed_experts}) is not divisible by the "
                f"world size {ws}"
            )
        return

    def need(value: int, what: str) -> None:
        if value % ws:
            raise Dsv3Error(f"{src}: {what} ({value}) is not divisible by the world size {ws}")

    need(cfg.num_attention_heads, "num_attention_heads")
    need(cfg.vocab_size, "vocab_size")
    if cfg.n_routed_experts:
        need(cfg.n_routed_experts, "n_routed_experts")
        if cfg.n_shared_experts:
            need(cfg.n_shared_experts * cfg.moe_intermediate_size, "n_shared_experts * moe_intermediate_size")
    layers = range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers)
    if any(not cfg.is_moe_layer(i) for i in layers):
        need(cfg.intermediate_size, "intermediate_size")
    if fmt_of is None:
        return
    from .names import hf_name

    for path, dim, size in split_linears(cfg, ws):
        if fmt_of(path) != FP8_BLOCK or size % FP8_BLOCK_SIZE == 0:
            continue
        what = "output rows" if dim == 0 else "input columns"
        raise Dsv3Error(
            f"{hf_name(path + '.weight', cfg)}: FP8 block-scaled weight cannot be split over {ws} ranks: "
            f"{size} {what} per rank is not a multiple of {FP8_BLOCK_SIZE} (choose another world size)"
        )
