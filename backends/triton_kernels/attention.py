"""Naive-form MLA attention over per-head keys and values (the ``attention`` operator).

This is the prefill path: many query tokens against per-head keys (``Dqk`` = nope + rope) and
values (``Dv``), the form in which prefill is cheapest (decode uses the absorbed latent form, see
``mla``). Flash-attention style: one program takes BLOCK_T query rows of one batch row and one
head and walks the keys in BLOCK_S tiles with an online softmax (float32, base 2), so no
(T x S) score matrix is ever written. Query row (b, t) sees keys ``j <= q_pos[b, t]`` with
``j < S``; positions may differ between rows (chunked prefill onto a cache, padded rows), and the
key loop stops at the largest position of the program's rows, so tiles past every row's position
are never read.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .jit_utils import TL_DTYPE, online_softmax_tile, round_to, row_max
from .runtime import HP_DTYPES, cdiv, check_device, check_tensor, interpreting, launch_opts, next_pow2, require

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["T", "S", "s_pb"])  # token counts and cache length change every call
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, o_ptr,
    T, H, S, DQK, DV, qk_scale,
    s_qb, s_qt, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_pb, s_pt, s_ob, s_ot, s_oh,
    CDT: tl.constexpr, HP_IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_QK: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    t_blocks = (T + BLOCK_T - 1) // BLOCK_T
    tb = t_blocks - 1 - pid % t_blocks  # the query blocks of one (row, head) run together, the longest first
    bh = pid // t_blocks
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    rows = tb * BLOCK_T + tl.arange(0, BLOCK_T)
    r_ok = rows < T
    r64 = rows.to(tl.int64)
    offs_qk = tl.arange(0, BLOCK_QK)
    offs_v = tl.arange(0, BLOCK_V)
    qk_ok = offs_qk < DQK
    v_ok = offs_v < DV

    # rows past T take position 0: they see key 0 only and are never stored
    pos = tl.load(pos_ptr + b * s_pb + r64 * s_pt, mask=r_ok, other=0).to(tl.int32)
    n_keys = tl.minimum(row_max(pos, 0) + 1, S)

    q = tl.load(
        q_ptr + b * s_qb + r64[:, None] * s_qt + h * s_qh + offs_qk[None, :],
        mask=r_ok[:, None] & qk_ok[None, :],
        other=0.0,
    )
    if HP_IEEE:
        q = q.to(tl.float32)
    m_i = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_T,), 0, tl.float32)
    acc = tl.full((BLOCK_T, BLOCK_V), 0, tl.float32)
    for s0 in range(0, n_keys, BLOCK_S):
        keys = s0 + tl.arange(0, BLOCK_S)
        k_ok = keys < n_keys
        k64 = keys.to(tl.int64)
        k = tl.load(
            k_ptr + b * s_kb + k64[:, None] * s_ks + h * s_kh + offs_qk[None, :],
            mask=k_ok[:, None] & qk_ok[None, :],
            other=0.0,
        )
        v = tl.load(
            v_ptr + b * s_vb + k64[:, None] * s_vs + h * s_vh + offs_v[None, :],
            mask=k_ok[:, None] & v_ok[None, :],
            other=0.0,
        )
        if HP_IEEE:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        visible = k_ok[None, :] & (keys[None, :] <= pos[:, None])
        scores = tl.where(visible, scores * qk_scale, float("-inf"))  # (BLOCK_T, BLOCK_S), log2 units
        m_i, l_i, acc = online_softmax_tile(scores, v, m_i, l_i, acc, CDT, HP_IEEE)

    o = acc / tl.maximum(l_i, 1e-30)[:, None]  # key 0 is visible to every row: l >= 1; guarded anyway
    o_off = b * s_ob + r64[:, None] * s_ot + h * s_oh + offs_v[None, :]
    tl.store(o_ptr + o_off, round_to(o, CDT), mask=r_ok[:, None] & v_ok[None, :])


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    blocks: tuple[int, int] | None = None,
) -> torch.Tensor:
    """q (B, T, H, Dqk), k (B, S, H, Dqk), v (B, S, H, Dv), q_pos (B, T) int64 -> (B, T, H, Dv) q.dtype.

    ``softmax_j(q[b,t,h]·k[b,j,h] * scale) @ v[b,:,h]`` over keys ``j <= q_pos[b, t]`` (and j < S),
    softmax in float32. Any strides with unit stride along the last dim (a copy is made otherwise).
    blocks: (BLOCK_T, BLOCK_S), powers of two >= 16, instead of the default tiling (for tests).
    """
    where = "attention"
    check_tensor(where, "q", q, HP_DTYPES, ndim=4)
    bsz, t, h, dqk = q.shape
    check_tensor(where, "k", k, (q.dtype,), ndim=4)
    s = k.shape[1]
    check_tensor(where, "k", k, (q.dtype,), shape=(bsz, s, h, dqk))
    check_tensor(where, "v", v, (q.dtype,), ndim=4)
    dv = v.shape[-1]
    check_tensor(where, "v", v, (q.dtype,), shape=(bsz, s, h, dv))
    check_tensor(where, "q_pos", q_pos, (torch.int64, torch.int32), shape=(bsz, t))
    require(s >= 1, where, "there are no keys (S = 0)")
    require(dqk >= 1 and dv >= 1, where, f"head dims must be >= 1, got Dqk = {dqk}, Dv = {dv}")
    check_device(where, q=q, k=k, v=v, q_pos=q_pos)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty((bsz, t, h, dv), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    block_qk, block_v = max(16, next_pow2(dqk)), max(16, next_pow2(dv))
    if interpreting():  # few, large programs: the interpreter pays per program and per operation
        block_t, block_s = min(128, max(16, next_pow2(t))), min(256, max(16, next_pow2(s)))
        opts = {}
    else:
        wide = block_qk > 128
        block_t = min(64, max(16, next_pow2(t)))
        block_s = 32 if wide else 64
        opts = launch_opts(8 if wide else 4, 2)
    if blocks is not None:
        require(
            len(blocks) == 2 and all(isinstance(n, int) and n >= 16 and n == next_pow2(n) for n in blocks),
            where,
            f"blocks must be two powers of two >= 16, got {blocks}",
        )
        block_t, block_s = blocks
    grid = (cdiv(t, block_t) * bsz * h,)
    _attention_kernel[grid](
        q, k, v, q_pos, out, t, h, s, dqk, dv, float(scale) * _LOG2E,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), q_pos.stride(0), q_pos.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        CDT=TL_DTYPE[q.dtype], HP_IEEE=interpreting() or q.dtype == torch.float32,
        BLOCK_T=block_t, BLOCK_S=block_s, BLOCK_QK=block_qk, BLOCK_V=block_v, **opts,
    )  # fmt: skip
    return out
