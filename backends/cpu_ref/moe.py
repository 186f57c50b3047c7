"""DeepSeekMoE routing and routed-expert computation, written for reading."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dsv3.model.config import Routing
from dsv3.weights import Weight

from .basic import _as, _f32


def moe_gate(
    x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, routing: Routing
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D), gate_weight (E, D) fp32, bias (E,) or None -> (weights (N, k) fp32, ids (N, k) int64)."""
    logits = torch.nn.functional.linear(_f32(x), _f32(gate_weight))  # (N, E)
    scores = logits.sigmoid() if routing.scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + _f32(bias)  # the bias only steers the choice
    if routing.n_group > 1:
        grouped = choice.view(x.shape[0], routing.n_group, -1)  # (N, G, E/G)
        if bias is None:
            group_score = grouped.amax(dim=-1)
        else:
            group_score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        best_groups = group_score.topk(routing.topk_group, dim=-1).indices  # (N, topk_group)
        # out of place, so the ONNX exporter can trace this same function
        ones = torch.ones_like(best_groups, dtype=group_score.dtype)
        keep = torch.zeros_like(group_score).scatter(1, best_groups, ones)  # (N, G)
        choice = grouped.masked_fill(keep.unsqueeze(-1) == 0, float("-inf")).flatten(1)  # (N, E)
    ids = choice.topk(routing.top_k, dim=-1).indices
    weights = scores.gather(1, ids)
    if routing.norm_topk_prob:  # k = 1 too: the weight is then 1 x scale (official model, transformers, vLLM)
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routing.scale, ids


#: ``batched(x (G, M, in), w: Weight (G, out, in)) -> (G, M, out)``: ``linear`` of each group with its own weight.
BatchedLinear = Callable[[torch.Tensor, Weight], torch.Tensor]


def moe_experts_with(linear, batched: BatchedLinear | None = None):
    """Build the reference expert computation on top of a linear implementation of one format.

    batched: the same linear over a stack of weights (``quant.batched_linear_for``). With it, a call
    that :func:`use_gathered` picks gathers each (token, slot) pair's expert weights and runs three
    batched products, with no host sync; otherwise (and without it) tokens are grouped by expert.
    """

    def moe_experts(
        x: torch.Tensor,
        weights: torch.Tensor,
        ids: torch.Tensor,
        w1: Weight,
        w3: Weight,
        w2: Weight,
        expert_offset: int = 0,
    ) -> torch.Tensor:
        """x (N, D), weights/ids (N, k), w1/w3 (E, I, D), w2 (E, D, I) -> (N, D) x.dtype."""
        if batched is not None and use_gathered(x, ids, w1.data.shape[0]):
            return _gathered(batched, x, weights, ids, w1, w3, w2, expert_offset)
        return _grouped(linear, x, weights, ids, w1, w3, w2, expert_offset)

    return moe_experts


def use_gathered(x: torch.Tensor, ids: torch.Tensor, experts: int) -> bool:
    """Whether ``moe_experts`` gathers: few (token, slot) pairs (N * k <= E) on an accelerator, where cpu_ref
    runs as another backend's fallback and a host sync stalls the device (and breaks graph capture).
    On a CPU the grouped path is faster: its ``.tolist()`` costs nothing there, while the gather copies
    the k experts' weights (measured in docs/benchmarks.md, "Lean decode step")."""
    return ids.numel() <= experts and x.device.type != "cpu"


def _gathered(
    batched: BatchedLinear,
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w1: Weight,
    w3: Weight,
    w2: Weight,
    expert_offset: int,
) -> torch.Tensor:
    """Each (token, slot) pair through its own expert's gathered weights -> (N, D) x.dtype.

    The k contributions of a token are summed in ascending expert order in float32, as ``_grouped``
    accumulates them, so both paths give the same result.
    """
    n, k = ids.shape
    e = w1.data.shape[0]
    local, order = (ids - expert_offset if expert_offset else ids).sort(dim=-1)  # (N, k): this rank's index, ascending
    mine = (local >= 0) & (local < e)  # (N, k): False for another rank's experts
    pick = local.clamp(0, e - 1).flatten()  # (N*k,) an expert that exists, for pairs then dropped
    xe = x.repeat_interleave(k, dim=0).unsqueeze(1)  # (N*k, 1, D): token n once per slot
    h = torch.nn.functional.silu(batched(xe, _pick(w1, pick))) * batched(xe, _pick(w3, pick))  # (N*k, 1, I)
    y = batched(h, _pick(w2, pick)).view(n, k, -1)  # (N, k, D)
    y = _f32(y) * weights.gather(1, order).unsqueeze(-1)
    return _as(torch.where(mine.unsqueeze(-1), y, 0).sum(dim=1), x.dtype)  # where: 0 * inf from a dropped pair is NaN


def _grouped(linear, x, weights, ids, w1: Weight, w3: Weight, w2: Weight, expert_offset: int) -> torch.Tensor:
    """Tokens grouped by expert, one linear per expert used -> (N, D) x.dtype (reads each expert once)."""
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    k = ids.shape[1]
    local = (ids - expert_offset).flatten()  # (N*k,): this rank's index of the expert in each (token, slot)
    # one sort groups the (token, slot) pairs by expert, tokens ascending within each group (what a
    # per-expert nonzero() would give, without one search per expert)
    pairs = torch.argsort(local, stable=True)  # (N*k,)
    experts, counts = torch.unique_consecutive(local[pairs], return_counts=True)
    tokens, chosen = pairs // k, weights.flatten()[pairs]  # (N*k,) each
    start = 0
    for e, n in zip(experts.tolist(), counts.tolist(), strict=True):
        token, weight = tokens[start : start + n], chosen[start : start + n]  # this expert's tokens
        start += n
        if not 0 <= e < w1.data.shape[0]:
            continue  # another rank's expert
        xe = x[token]
        h = torch.nn.functional.silu(linear(xe, _one(w1, e))) * linear(xe, _one(w3, e))
        ye = linear(h, _one(w2, e))
        # a token meets each expert at most once, so this is exact; index_put_ because CPU
        # index_add_ costs ~0.2 ms per call even on tiny tensors (100x more, measured)
        out.index_put_((token,), ye.float() * weight.unsqueeze(-1), accumulate=True)
    return out.to(x.dtype)


def _one(w: Weight, e: int) -> Weight:
    scale = None if w.scale is None else w.scale[e]
    return Weight(w.data[e], w.fmt, scale, w.block_size, w.scale_fmt)


def _pick(w: Weight, experts: torch.Tensor) -> Weight:
    """The stacked weight's experts ``experts (G,)`` as a stack (G, out, in) (copies)."""
    scale = None if w.scale is None else w.scale[experts]
    return Weight(w.data[experts], w.fmt, scale, w.block_size, w.scale_fmt)
