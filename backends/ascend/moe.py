"""DeepSeekMoE routing and routed experts through torch_npu's MoE operators.

Gate: ``torch_npu.npu_moe_gating_top_k(x=logits (N, E), k, bias, k_group, group_count,
group_select_mode, renorm=0, norm_type, out_flag=False, routed_scaling_factor, eps)``. Its
documented computation is DeepSeek's: scores = sigmoid (norm_type=1) or softmax (norm_type=0)
of x; the bias is added only to choose; groups ranked by the sum of their top-2 biased scores
(group_select_mode=1) or their max (0); the top ``k_group`` groups are eligible; the weights are
the unbiased scores of the chosen experts, divided by their sum (+eps) in sigmoid mode only, then
times routed_scaling_factor. Routings outside that (sigmoid without renormalization, softmax
with it) and expert counts outside its limits run cpu_ref's gate, with a warning.

Experts: tokens are sorted by expert in plain torch, then each projection is one
``torch_npu.npu_grouped_matmul([x], [W (E, in, out)], group_list=tokens per expert,
group_list_type=1, group_type=0, split_item=2)`` over all local experts (the (E, out, in) weight
passed as its transposed view, which the operator takes), with ``npu_swiglu`` between. In W8A8 the
activations are quantized per token with ``npu_dynamic_quant`` and the operator dequantizes with
``scale=[w_scale (E, out)]`` and ``per_token_scale=[s (M,)]``.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from dsv3.backends.cpu_ref import moe as ref
from dsv3.model.config import Routing
from dsv3.weights import Weight

from .fallback import warn_fallback

MAX_EXPERTS = 2048  # npu_moe_gating_top_k: x.shape[-1] <= 2048
MAX_GROUPS = 1024  # npu_grouped_matmul: group_list holds at most 1024 groups
GATING = "npu_moe_gating_top_k"


@lru_cache(maxsize=64)
def gating_misfit(routing: Routing, n_experts: int) -> str | None:
    """Why npu_moe_gating_top_k cannot compute this routing (None when it can), from its documented limits."""
    renorm = routing.norm_topk_prob  # for k = 1 too (the weight is then the scale), as cpu_ref
    if routing.scoring == "sigmoid" and not renorm:
        return "sigmoid scores without renormalization (it always renormalizes them)"
    if routing.scoring == "softmax" and renorm:
        return "renormalized softmax scores (it never renormalizes them)"
    if routing.scoring not in ("sigmoid", "softmax"):
        return f"{routing.scoring} scoring"
    g = routing.n_group
    per_group = n_experts // g if n_experts % g == 0 else 0
    if n_experts > MAX_EXPERTS or per_group <= 2 or -(-per_group // 32) * 32 * g > MAX_EXPERTS:
        return f"{n_experts} experts in {g} groups"
    if not (1 <= routing.topk_group <= g and 1 <= routing.top_k <= per_group * routing.topk_group):
        return f"top-{routing.top_k} of {routing.topk_group} groups out of {g}"
    return None


def moe_gate_with(tn):
    def moe_gate(x: torch.Tensor, gate_weight: torch.Tensor, bias: torch.Tensor | None, routing: Routing):
        """x (N, D), gate_weight (E, D) fp32, bias (E,) fp32 or None -> (weights (N, k) fp32, ids (N, k) int64)."""
        logits = x.float() @ gate_weight.float().t()  # (N, E), the router's product in float32
        why = gating_misfit(routing, logits.shape[-1])
        if why is not None:
            warn_fallback("moe_gate", GATING, why)
            return ref.moe_gate(x, gate_weight, bias, routing)
        weights, ids, _ = tn.npu_moe_gating_top_k(
            logits,
            routing.top_k,
            bias=None if bias is None else bias.float(),
            k_group=routing.topk_group,
            group_count=routing.n_group,
            group_select_mode=0 if bias is None else 1,
            renorm=0,
            norm_type=1 if routing.scoring == "sigmoid" else 0,
            out_flag=False,
            routed_scaling_factor=routing.scale,
            eps=1e-20,
        )  # (N, k) fp32, (N, k) int32
        return weights, ids.long()

    return moe_gate


def _sort_by_expert(ids: torch.Tensor, offset: int, n_local: int):
    """ids (N, k) -> (rows (M,) indices into the flattened (N*k) slots, sorted by local expert;
    counts (E_local,) int64). Slots routed to another rank's experts are left out."""
    local = (ids - offset).flatten()  # (N*k,)
    mine = (local >= 0) & (local < n_local)
    key = torch.where(mine, local, torch.full_like(local, n_local))  # others sort last
    order = torch.argsort(key, stable=True)
    counts = torch.bincount(key, minlength=n_local + 1)[:n_local]
    return order[: int(counts.sum())], counts


def moe_experts_with(tn, quantized: bool):
    def gmm(x: torch.Tensor, w: Weight, counts: torch.Tensor) -> torch.Tensor:
        """x (M, in) rows grouped by expert, w (E, out, in) -> (M, out) x.dtype."""
        weight = w.data.transpose(1, 2)  # (E, in, out), a transposed view
        if not quantized:
            return tn.npu_grouped_matmul(
                [x], [weight], group_list=counts, group_list_type=1, group_type=0, split_item=2
            )[0]
        q, s = tn.npu_dynamic_quant(x)  # (M, in) int8, (M,) fp32
        # per-token dequant with a bf16 output takes a bf16 weight scale; an fp16 output an fp32 one
        scale = w.scale.to(torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)
        return tn.npu_grouped_matmul(
            [q],
            [weight],
            scale=[scale],
            per_token_scale=[s],
            group_list=counts,
            group_list_type=1,
            group_type=0,
            split_item=2,
            output_dtype=x.dtype,
        )[0]

    def moe_experts(x, weights, ids, w1: Weight, w3: Weight, w2: Weight, expert_offset: int = 0) -> torch.Tensor:
        """x (N, D), weights/ids (N, k), w1/w3 (E, I, D), w2 (E, D, I) -> (N, D) x.dtype."""
        n, k = ids.shape
        rows, counts = _sort_by_expert(ids, expert_offset, w1.data.shape[0])  # (M,), (E,)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if rows.numel() == 0:
            return out.to(x.dtype)
        token = rows // k  # (M,) source token of each routed slot
        xs = x[token]  # (M, D), grouped by expert
        h = tn.npu_swiglu(torch.cat([gmm(xs, w1, counts), gmm(xs, w3, counts)], dim=-1), dim=-1)  # (M, I)
        y = gmm(h, w2, counts)  # (M, D)
        out.index_add_(0, token, y.float() * weights.flatten()[rows].unsqueeze(-1))
        return out.to(x.dtype)

    return moe_experts
