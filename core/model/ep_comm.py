"""Expert-parallel communication: the reference ``moe_dispatch`` / ``moe_combine`` and their check.

The reference is plain ``torch.distributed.all_to_all_single`` (counts first, then payloads), so it
runs on gloo. A backend may supply its own pair (DeepEP, HCCL/MC2) through the optional hooks
``dsv3_comm_moe_dispatch`` / ``dsv3_comm_moe_combine`` in ``dsv3.hookspecs``; :func:`check_moe_comm`
is the conformance check for such a pair. The MoE layers call the pair under ``--dp-attention``
through :class:`ExpertParallel`, which also keeps every rank's layers in step.

Order (deterministic, so results are exact): each rank sends its (token, slot) pairs grouped by
destination rank ``ids // experts_per_rank``, within a destination in token-major, slot-minor order;
a rank receives source rank 0's rows first, then rank 1's, and so on. Combine puts each returned row
back at its (token, slot) place and sums ``weights[n, j] * y`` over the slots j in order, so the
result equals the single-process ``(weights[..., None] * out).sum(1)`` bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import Dsv3Error


@dataclass
class DispatchHandle:
    """What combine needs to send rows back: the source layout of one dispatch.

    order: (N*k,) int64, flat (token * k + slot) index of each sent row, in send order.
    send_splits / recv_splits: rows sent to / received from each rank.
    weights: (N, k) fp32 top-k weights of the source tokens.
    """

    order: Tensor
    send_splits: list[int]
    recv_splits: list[int]
    weights: Tensor
    group: object | None


def _a2a(x: Tensor, recv: list[int], send: list[int], group) -> Tensor:
    out = x.new_empty((sum(recv), *x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), recv, send, group=group)
    return out


def moe_dispatch(
    x: Tensor, ids: Tensor, weights: Tensor, experts_per_rank: int, group=None
) -> tuple[Tensor, Tensor, Tensor, DispatchHandle]:
    """``moe_dispatch(x (N, D), ids (N, k) int64 global expert ids, weights (N, k) fp32,
    experts_per_rank: int, group) -> (recv_x (M, D) x.dtype, recv_local_ids (M,) int64,
    recv_weights (M,) fp32, handle)``.

    Sends each token's row once per top-k slot to the rank owning that expert (``id //
    experts_per_rank``); ``recv_local_ids`` are ``id - rank * experts_per_rank``. Order: module doc.
    """
    if x.dim() != 2 or ids.shape != weights.shape or ids.shape[0] != x.shape[0]:
        raise Dsv3Error(
            f"moe_dispatch: x (N, D), ids and weights (N, k) expected, got {tuple(x.shape)}, "
            f"{tuple(ids.shape)}, {tuple(weights.shape)}"
        )
    if experts_per_rank < 1:
        raise Dsv3Error(f"moe_dispatch: experts_per_rank must be >= 1, got {experts_per_rank}")
    world = dist.get_world_size(group)
    k = ids.shape[1]
    flat_ids = ids.reshape(-1)
    dest = torch.div(flat_ids, experts_per_rank, rounding_mode="floor")
    if flat_ids.numel() and (int(flat_ids.min()) < 0 or int(dest.max()) >= world):
        raise Dsv3Error(f"moe_dispatch: ids must lie in [0, {world * experts_per_rank})")
    order = torch.sort(dest, stable=True).indices
    send_counts = torch.bincount(dest, minlength=world).to(torch.int64)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts, group=group)
    send, recv = send_counts.tolist(), recv_counts.tolist()
    rank = dist.get_rank(group)
    recv_x = _a2a(x[order // k], recv, send, group)
    recv_ids = _a2a(flat_ids[order], recv, send, group) - rank * experts_per_rank
    recv_w = _a2a(weights.reshape(-1)[order].float(), recv, send, group)
    return recv_x, recv_ids, recv_w, DispatchHandle(order, send, recv, weights.float(), group)


def moe_combine(y: Tensor, handle: DispatchHandle) -> Tensor:
    """``moe_combine(y (M, D), handle) -> (N, D) y.dtype``: rows back to their source ranks, then
    ``out[n] = sum_j weights[n, j] * y_of(n, j)`` (slots in order, fp32-exact; module doc)."""
    back = _a2a(y, handle.send_splits, handle.recv_splits, handle.group)
    n, k = handle.weights.shape
    buf = y.new_zeros((n * k, y.shape[1]))
    buf[handle.order] = back
    return (handle.weights[..., None].to(y.dtype) * buf.view(n, k, y.shape[1])).sum(1)


DispatchFn = Callable[..., tuple[Tensor, Tensor, Tensor, object]]
CombineFn = Callable[[Tensor, object], Tensor]


def check_moe_comm(
    dispatch: DispatchFn = moe_dispatch,
    combine: CombineFn = moe_combine,
    *,
    group=None,
    experts_per_rank: int = 3,
    tokens: int = 17,
    dim: int = 8,
    k: int = 4,
    seed: int = 0,
) -> None:
    """Run on every rank of ``group``: random tokens, ids and weights per rank (the token count varies
    by rank, rank 1 gets none), dispatch -> ``y = x * (global_id + 1)`` -> combine must equal the
    single-process result exactly (fp32). Raises Dsv3Error naming the rank and the first bad token.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    g = torch.Generator().manual_seed(seed * 1000 + rank)
    n = 0 if rank == 1 else tokens + rank
    x = torch.randn(n, dim, generator=g)
    ids = (
        torch.stack([torch.randperm(world * experts_per_rank, generator=g)[:k] for _ in range(n)])
        if n
        else (torch.empty(0, k, dtype=torch.int64))
    )
    w = torch.rand(n, k, generator=g)
    recv_x, recv_ids, _recv_w, handle = dispatch(x, ids, w, experts_per_rank, group)
    gid = recv_ids.to(torch.int64) + rank * experts_per_rank
    y = recv_x * (gid + 1).to(recv_x.dtype)[:, None]
    out = combine(y, handle)
    want = (w[..., None] * (x[:, None, :] * (ids + 1).to(x.dtype)[..., None])).sum(1)
    if out.shape != want.shape:
        raise Dsv3Error(f"moe comm check: rank {rank}: combine returned {tuple(out.shape)}, want {tuple(want.shape)}")
    bad = (out != want).any(-1).nonzero()
    if bad.numel():
        t = int(bad[0])
        raise Dsv3Error(
            f"moe comm check: rank {rank}: token {t} of {n} differs (max abs err {float((out - want).abs().max()):.3g})"
        )


def resolve_moe_comm(hook) -> tuple[DispatchFn, CombineFn]:
    """The (dispatch, combine) pair from a plugin manager's ``hook`` relay (None: no plugin manager): the
    backend's own when it supplies both, else the reference (a lone half is refused: the handle is
    private to its pair)."""
    if hook is None:
        return moe_dispatch, moe_combine
    d, c = hook.dsv3_comm_moe_dispatch(), hook.dsv3_comm_moe_combine()
    if (d is None) != (c is None):
        raise Dsv3Error("dsv3_comm_moe_dispatch and dsv3_comm_moe_combine: a backend must supply both or neither")
    return (d, c) if d is not None else (moe_dispatch, moe_combine)


# ---------------------------------------------------------------- the model's side (--dp-attention)
IDLE = -1  #: the code of a rank with no MoE layer to run (its requests are done, or it has none)


class ExpertParallel:
    """Keeps the MoE layers of data-parallel ranks in step: each rank runs its own requests, so ranks
    reach their MoE layers at their own pace, with their own token counts (0 included).

    Before every dispatch the ranks all-gather one integer each: the code of the MoE layer they wait
    in (``layers`` key: the layer index, MTP layers after the main ones) or :data:`IDLE`. The round
    runs the smallest code waited on: the ranks waiting there with their tokens, every other rank with
    none (0 rows out, its experts still serve the rows it receives); a rank waiting on another layer
    goes round again. So the ranks' forwards need not match call for call (a rank may prefill while
    another decodes, run MTP drafts or stop early), nothing deadlocks (the smallest code always runs),
    and a finished rank stays available in :meth:`idle` until every rank is idle.

    Cost: one all-gather of ``world`` int64 per MoE layer call, besides dispatch and combine.
    """

    def __init__(self, rank: int, world_size: int, group=None, device: str = "cpu"):
        self.rank, self.world_size, self.group, self.device = rank, world_size, group, device
        self.layers: dict[int, Callable[[Tensor | None], Tensor]] = {}
        self.dispatch: DispatchFn = moe_dispatch
        self.combine: CombineFn = moe_combine
        self.rounds = 0  # code exchanges so far (a measure of the protocol's cost)
        self.empty_rounds = 0  # rounds this rank ran a layer with no tokens of its own

    def set_comm(self, dispatch: DispatchFn, combine: CombineFn) -> None:
        """Use this (dispatch, combine) pair (``resolve_moe_comm``: a backend's own or the reference)."""
        self.dispatch, self.combine = dispatch, combine

    def _codes(self, code: int) -> list[int]:
        mine = torch.tensor([code], dtype=torch.int64, device=self.device)
        parts = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(parts, mine, group=self.group)
        self.rounds += 1
        return [int(p) for p in parts]

    def _serve(self, codes: list[int]) -> int:
        """The code this round runs (the smallest waited on); runs it here with no tokens unless it is ours."""
        run = min(c for c in codes if c != IDLE)
        if run not in self.layers:
            raise Dsv3Error(f"--dp-attention: rank {self.rank} has no MoE layer {run} (ranks hold different models)")
        return run

    def run(self, code: int, x: Tensor) -> Tensor:
        """Run MoE layer ``code`` on this rank's tokens x (N, D) -> (N, D), joining other layers' rounds
        with no tokens until it is this layer's turn."""
        while True:
            run = self._serve(self._codes(code))
            if run == code:
                return self.layers[code](x)
            self.empty_rounds += 1
            self.layers[run](None)

    def idle(self) -> None:
        """Serve other ranks' MoE layers with no tokens until every rank is idle (call on every rank
        when its requests are done, or at once when it has none)."""
        while True:
            codes = self._codes(IDLE)
            if all(c == IDLE for c in codes):
                return
            self.empty_rounds += 1
            self.layers[self._serve(codes)](None)
