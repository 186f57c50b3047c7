"""Routed experts over tokens grouped by expert: two grouped GEMM launches, no loop over experts.

1. ``align_by_expert`` sorts the (token, slot) assignments by local expert and pads each expert's
   run to a multiple of BLOCK_M, so every M block of the sorted list belongs to one expert. It uses
   only tensor ops with sizes known on the host (an upper bound on the padded length), so there is
   no device-to-host synchronisation.
2. Gate and up projections in one launch (two accumulators), gathering rows of x by token and
   writing ``silu(x w1) * (x w3)`` in sorted order.
3. The down projection reads that, multiplies each row by its routing weight and writes it to the
   row of its assignment; the k slots of a token are then summed in float32.
"""

from __future__ import annotations

import dataclasses

import torch

from dsv3.weights import FP8_DTYPES

from .gemm import A_FP8, A_HP, A_INT8, B_FP8, B_HP, B_INT8, ROWS_GATHER, ROWS_SCATTER, launch_gemm, pick_config
from .quant import act_quant_fp8, act_quant_int8
from .runtime import HP_DTYPES, QBLOCK, cdiv, check_device, check_tensor, require


def align_by_expert(
    ids: torch.Tensor, expert_offset: int, n_local: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (N, k) int64 global expert ids -> (sorted_rows (R,) int32, block_expert (R/block_m,) int32).

    ``sorted_rows`` lists assignment indices ``n * k + slot`` grouped by local expert, each group
    padded with -1 to a multiple of block_m; ``block_expert[j]`` is the expert of block j (-1 past
    the end). Assignments to experts outside ``[offset, offset + n_local)`` are dropped.
    """
    device = ids.device
    local = ids.reshape(-1) - expert_offset  # (A,)
    n_assign = local.numel()
    valid = (local >= 0) & (local < n_local)
    key = torch.where(valid, local, n_local)  # dropped assignments sort last, into bucket n_local
    order = torch.argsort(key, stable=True)  # (A,) assignment indices by expert
    ones = torch.ones_like(key)
    counts = torch.zeros(n_local + 1, dtype=key.dtype, device=device).scatter_add_(0, key, ones)[:n_local]  # (E,)
    padded = (counts + block_m - 1) // block_m * block_m
    pad_start = torch.cumsum(padded, 0) - padded  # (E,) where each expert's run begins
    raw_start = torch.cumsum(counts, 0) - counts  # (E,) where it begins in `order`
    max_blocks = cdiv(n_assign, block_m) + min(n_local, n_assign)
    size = max_blocks * block_m
    sorted_key = key[order]
    ok = sorted_key < n_local
    safe_key = torch.where(ok, sorted_key, 0)
    dest = pad_start[safe_key] + torch.arange(n_assign, device=device) - raw_start[safe_key]
    dest = torch.where(ok, dest, size)  # dropped ones land in a spare slot, cut off below
    sorted_rows = torch.full((size + 1,), -1, dtype=torch.int32, device=device)
    sorted_rows.scatter_(0, dest, order.to(torch.int32))
    block_end = torch.cumsum(padded // block_m, 0)  # (E,) first block after each expert
    block_expert = torch.searchsorted(block_end, torch.arange(max_blocks, device=device), right=True)
    block_expert = torch.where(block_expert < n_local, block_expert, -1).to(torch.int32)
    return sorted_rows[:size], block_expert


def _kinds(fmt: str, act_quant: str) -> tuple[int, int]:
    b_kind = {"hp": B_HP, "fp8_block": B_FP8, "int8_w8a8": B_INT8, "int8_wo": B_INT8}[fmt]
    if act_quant == "dynamic" and fmt == "fp8_block":
        return A_FP8, b_kind
    if act_quant == "dynamic" and fmt == "int8_w8a8":
        return A_INT8, b_kind
    return A_HP, b_kind


def _quantize_rows(x: torch.Tensor, a_kind: int, fp8_dtype, scale_fmt):
    if a_kind == A_FP8:
        return act_quant_fp8(x, fp8_dtype, scale_fmt)
    if a_kind == A_INT8:
        return act_quant_int8(x)
    return x, None


def _check_expert_weight(where: str, name: str, w, fmt: str, e: int | None, out: int | None, inp: int | None):
    data_dtypes = {"hp": HP_DTYPES, "fp8_block": FP8_DTYPES}.get(fmt, (torch.int8,))
    check_tensor(where, f"{name}.data", w.data, data_dtypes, shape=(e, out, inp))
    e, out, inp = w.data.shape
    if fmt == "fp8_block":
        check_tensor(where, f"{name}.scale", w.scale, (torch.float32,), shape=(e, cdiv(out, QBLOCK), cdiv(inp, QBLOCK)))
    elif fmt != "hp":
        check_tensor(where, f"{name}.scale", w.scale, (torch.float32,), shape=(e, out))
    return e, out, inp


def moe_experts(
    x: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    w1,
    w3,
    w2,
    expert_offset: int = 0,
    act_quant: str = "none",
) -> torch.Tensor:
    """x (N, D), weights (N, k) fp32, ids (N, k) int64, w1/w3 Weight (E, I, D), w2 Weight (E, D, I)
    -> (N, D) x.dtype: ``sum_k weights * w2[e] @ (silu(w1[e] @ x) * (w3[e] @ x))``, e = id - offset.

    The three weights share one format (``w1.fmt``); act_quant "dynamic" quantizes activations per
    token (fp8 1 x 128 groups or int8) as ``linear`` does.
    """
    where = "moe_experts"
    fmt = w1.fmt
    require(w3.fmt == fmt and w2.fmt == fmt, where, f"w1, w3, w2 must share a format, got {fmt}, {w3.fmt}, {w2.fmt}")
    require(fmt in ("hp", "fp8_block", "int8_w8a8", "int8_wo"), where, f"unknown weight format {fmt!r}")
    require(act_quant in ("none", "dynamic"), where, f"act_quant must be 'none' or 'dynamic', got {act_quant!r}")
    check_tensor(where, "x", x, HP_DTYPES, ndim=2)
    n_tok, dim = x.shape
    check_tensor(where, "ids", ids, (torch.int64, torch.int32), ndim=2)
    topk = ids.shape[1]
    require(ids.shape[0] == n_tok, where, f"ids has {ids.shape[0]} rows for {n_tok} tokens")
    check_tensor(where, "weights", weights, (torch.float32,), shape=(n_tok, topk))
    n_exp, inter, _ = _check_expert_weight(where, "w1", w1, fmt, None, None, dim)
    _check_expert_weight(where, "w3", w3, fmt, n_exp, inter, dim)
    _check_expert_weight(where, "w2", w2, fmt, n_exp, dim, inter)
    if fmt == "hp":
        require(w1.data.dtype == x.dtype, where, f"hp expert weights are {w1.data.dtype} but x is {x.dtype}")
    check_device(where, x=x, ids=ids, weights=weights, w1=w1.data, w3=w3.data, w2=w2.data)
    if n_tok == 0:
        return torch.zeros_like(x)
    a_kind, b_kind = _kinds(fmt, act_quant)
    fp8_dtype, scale_fmt = w1.data.dtype, w1.scale_fmt
    x = x.contiguous()
    n_assign = n_tok * topk
    a_dtype = x.dtype if a_kind == A_HP else None  # tile sizes depend on the bytes of A
    cfg1 = pick_config(
        max(1, n_assign // max(1, min(n_exp, n_assign))), inter, dim, a_kind, b_kind, True, False, None, a_dtype
    )
    rows, block_expert = align_by_expert(ids, expert_offset, n_exp, cfg1.block_m)
    n_rows = rows.numel()

    xa, xs = _quantize_rows(x, a_kind, fp8_dtype, scale_fmt)
    # zeros: blocks past the last expert are never written, and activation quantization reads them
    h = torch.zeros((n_rows, inter), dtype=x.dtype, device=x.device)
    launch_gemm(
        xa, xs, w1.data, w1.scale, h, a_kind=a_kind, b_kind=b_kind, m=n_rows, cdt=x.dtype,
        b2=w3.data, b2_scale=w3.scale, rows=rows, rows_mode=ROWS_GATHER, topk=topk,
        block_expert=block_expert, config=cfg1,
    )  # fmt: skip

    ha, hs = _quantize_rows(h, a_kind, fp8_dtype, scale_fmt)
    cfg2 = pick_config(cfg1.block_m, dim, inter, a_kind, b_kind, allow_split=False, a_dtype=a_dtype)
    cfg2 = dataclasses.replace(cfg2, block_m=cfg1.block_m)  # blocks must match the alignment
    y = torch.zeros((n_assign, dim), dtype=torch.float32, device=x.device)
    launch_gemm(
        ha, hs, w2.data, w2.scale, y, a_kind=a_kind, b_kind=b_kind, m=n_rows, cdt=x.dtype,
        rows=rows, rows_mode=ROWS_SCATTER, block_expert=block_expert,
        row_weight=weights.reshape(-1).contiguous(), config=cfg2,
    )  # fmt: skip
    return y.view(n_tok, topk, dim).sum(1).to(x.dtype)
