"""DeepSeekMoE routing and routed-expert computation, written for reading."""

from __future__ import annotations

import torch

from dsv3.model.config import Routing
from dsv3.weights import Weight


def moe_gate(
    x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, routing: Routing
) -> tuple[torch.Tensor, torch.Tensor]:
    """x (N, D), gate_weight (E, D) fp32, bias (E,) or None -> (weights (N, k) fp32, ids (N, k) int64)."""
    logits = x.float() @ gate_weight.float().t()  # (N, E)
    scores = logits.sigmoid() if routing.scoring == "sigmoid" else logits.softmax(dim=-1)
    choice = scores if bias is None else scores + bias.float()  # the bias only steers the choice
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
    if routing.norm_topk_prob and routing.top_k > 1:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * routing.scale, ids


def moe_experts_with(linear):
    """Build the reference expert computation on top of a linear implementation of one format."""

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

    return moe_experts


def _one(w: Weight, e: int) -> Weight:
    scale = None if w.scale is None else w.scale[e]
    return Weight(w.data[e], w.fmt, scale, w.block_size, w.scale_fmt)
