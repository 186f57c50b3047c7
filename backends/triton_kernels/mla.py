"""Weight-absorbed MLA attention over the latent cache (the ``mla_latent_attention`` operator).

Every query row (b, t) attends to cache positions ``0..q_pos[b, t]``. One program takes BLOCK_H
heads of one row (the heads share the cached latent, so scores are a (BLOCK_H x C) @ (C x BLOCK_S)
product) over one slice of the keys; with several slices (split-KV, "flash decoding") the partial
results are merged with their log-sum-exp. Decode (T = 1) is the case this is built for; prefill
(T > 1) runs through the same kernel, one program per query row, correct but without reuse of keys
across rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .jit_utils import TL_DTYPE, online_softmax_tile, round_to
from .runtime import HP_DTYPES, cdiv, check_device, check_tensor, interpreting, next_pow2, require, sm_count

_LOG2E = 1.4426950408889634


@triton.jit(do_not_specialize=["T", "S", "keys_per_split"])  # the cache grows every step: one compile
def _mla_kernel(
    ql_ptr, qp_ptr, kv_ptr, pe_ptr, pos_ptr, o_ptr, lse_ptr,
    T, H, S, C, R, keys_per_split, qk_scale,
    s_qlb, s_qlt, s_qlh, s_qpb, s_qpt, s_qph,
    s_kvb, s_kvs, s_peb, s_pes, s_posb,
    s_os, s_ob, s_ot, s_oh, s_ls, s_lb, s_lt,
    CDT: tl.constexpr, OUT: tl.constexpr, HP_IEEE: tl.constexpr, WRITE_LSE: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    b = (row // T).to(tl.int64)
    t = (row % T).to(tl.int64)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = heads < H
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    c_ok = offs_c < C
    r_ok = offs_r < R

    pos = tl.load(pos_ptr + b * s_posb + t).to(tl.int32)  # loop bounds in one integer type
    n_keys = tl.minimum(pos + 1, S)
    lo = split * keys_per_split
    hi = tl.minimum(lo + keys_per_split, n_keys)

    q = tl.load(
        ql_ptr + b * s_qlb + t * s_qlt + heads[:, None] * s_qlh + offs_c[None, :],
        mask=h_ok[:, None] & c_ok[None, :],
        other=0.0,
    )
    qp = tl.load(
        qp_ptr + b * s_qpb + t * s_qpt + heads[:, None] * s_qph + offs_r[None, :],
        mask=h_ok[:, None] & r_ok[None, :],
        other=0.0,
    )
    if HP_IEEE:
        q = q.to(tl.float32)
        qp = qp.to(tl.float32)
    m_i = tl.full((BLOCK_H,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_H,), 0, tl.float32)
    acc = tl.full((BLOCK_H, BLOCK_C), 0, tl.float32)
    for s0 in range(lo, hi, BLOCK_S):
        keys = s0 + tl.arange(0, BLOCK_S)
        k_ok = keys < hi
        k64 = keys.to(tl.int64)
        kv = tl.load(
            kv_ptr + b * s_kvb + k64[:, None] * s_kvs + offs_c[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0
        )
        pe = tl.load(
            pe_ptr + b * s_peb + k64[:, None] * s_pes + offs_r[None, :], mask=k_ok[:, None] & r_ok[None, :], other=0.0
        )
        if HP_IEEE:
            kv = kv.to(tl.float32)
            pe = pe.to(tl.float32)
            scores = tl.dot(q, tl.trans(kv), input_precision="ieee") + tl.dot(qp, tl.trans(pe), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(kv)) + tl.dot(qp, tl.trans(pe))
        scores = tl.where(k_ok[None, :], scores * qk_scale, float("-inf"))  # (BLOCK_H, BLOCK_S), log2 units
        m_i, l_i, acc = online_softmax_tile(scores, kv, m_i, l_i, acc, CDT, HP_IEEE)

    o_off = split * s_os + b * s_ob + t * s_ot + heads[:, None] * s_oh + offs_c[None, :]
    o = acc / tl.maximum(l_i, 1e-30)[:, None]  # a slice with no visible key has acc = 0, l = 0
    tl.store(o_ptr + o_off, round_to(o, OUT), mask=h_ok[:, None] & c_ok[None, :])
    if WRITE_LSE:  # log2-sum-exp of the slice, for merging slices
        lse = tl.where(l_i > 0, m_i + tl.log2(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(lse_ptr + split * s_ls + b * s_lb + t * s_lt + heads, lse, mask=h_ok)


def mla_latent_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv: torch.Tensor,
    pe: torch.Tensor,
    q_pos: torch.Tensor,
    scale: float,
    num_splits: int | None = None,
) -> torch.Tensor:
    """q_latent (B, T, H, C), q_pe (B, T, H, R), kv (B, S, C), pe (B, S, R), q_pos (B, T) int64
    -> (B, T, H, C) q_latent.dtype.

    ``softmax_j((q_latent·kv[j] + q_pe·pe[j]) * scale) @ kv`` over keys ``j <= q_pos[b, t]``,
    softmax in float32. num_splits: key slices per row (None: enough to fill the GPU).
    """
    where = "mla_latent_attention"
    check_tensor(where, "q_latent", q_latent, HP_DTYPES, ndim=4)
    bsz, t, h, c = q_latent.shape
    check_tensor(where, "q_pe", q_pe, (q_latent.dtype,), ndim=4)
    r = q_pe.shape[-1]
    check_tensor(where, "q_pe", q_pe, (q_latent.dtype,), shape=(bsz, t, h, r))
    check_tensor(where, "kv", kv, (q_latent.dtype,), ndim=3)
    s = kv.shape[1]
    check_tensor(where, "kv", kv, (q_latent.dtype,), shape=(bsz, s, c))
    check_tensor(where, "pe", pe, (q_latent.dtype,), shape=(bsz, s, r))
    check_tensor(where, "q_pos", q_pos, (torch.int64, torch.int32), shape=(bsz, t))
    require(s >= 1, where, "the cache is empty (S = 0)")
    check_device(where, q_latent=q_latent, q_pe=q_pe, kv=kv, pe=pe, q_pos=q_pos)
    ql, qp, kv, pe = (x if x.stride(-1) == 1 else x.contiguous() for x in (q_latent, q_pe, kv, pe))
    out = torch.empty((bsz, t, h, c), dtype=q_latent.dtype, device=q_latent.device)
    if out.numel() == 0:
        return out
    interp = interpreting()
    block_c, block_r = max(16, next_pow2(c)), max(16, next_pow2(r))
    if interp:  # few, large programs: the interpreter pays per program and per operation
        block_h, block_s = min(128, max(16, next_pow2(h))), min(256, max(16, next_pow2(s)))
    else:
        block_h, block_s = 16, (32 if block_c >= 256 else 64)
    h_blocks = cdiv(h, block_h)
    if num_splits is None:
        num_splits = 1
        if not interp:
            rows = bsz * t * h_blocks
            num_splits = max(1, min(cdiv(2 * sm_count(q_latent.device.index or 0), rows), cdiv(s, 256)))
    keys_per_split = cdiv(cdiv(s, num_splits), block_s) * block_s
    num_splits = cdiv(s, keys_per_split)
    cdt = TL_DTYPE[q_latent.dtype]
    common = dict(CDT=cdt, HP_IEEE=interp or q_latent.dtype == torch.float32, BLOCK_H=block_h, BLOCK_S=block_s,
                  BLOCK_C=block_c, BLOCK_R=block_r, num_warps=4 if block_c <= 128 else 8, num_stages=2)  # fmt: skip
    grid = (bsz * t, h_blocks, num_splits)
    qk_scale = float(scale) * _LOG2E
    strides = (ql.stride(0), ql.stride(1), ql.stride(2), qp.stride(0), qp.stride(1), qp.stride(2),
               kv.stride(0), kv.stride(1), pe.stride(0), pe.stride(1), q_pos.stride(0))  # fmt: skip
    if num_splits == 1:
        _mla_kernel[grid](
            ql, qp, kv, pe, q_pos, out, out, t, h, s, c, r, keys_per_split, qk_scale, *strides,
            0, out.stride(0), out.stride(1), out.stride(2), 0, 0, 0, OUT=cdt, WRITE_LSE=False, **common,
        )  # fmt: skip
        return out
    part = torch.empty((num_splits, bsz, t, h, c), dtype=torch.float32, device=out.device)
    lse = torch.empty((num_splits, bsz, t, h), dtype=torch.float32, device=out.device)
    _mla_kernel[grid](
        ql, qp, kv, pe, q_pos, part, lse, t, h, s, c, r, keys_per_split, qk_scale, *strides,
        part.stride(0), part.stride(1), part.stride(2), part.stride(3), lse.stride(0), lse.stride(1), lse.stride(2),
        OUT=tl.float32, WRITE_LSE=True, **common,
    )  # fmt: skip
    # merge the slices: each holds its own softmax average; weight them by their share of the mass
    w = torch.exp2(lse - lse.amax(0, keepdim=True))  # (splits, B, T, H); key 0 is visible to every row
    w = w / w.sum(0, keepdim=True)
    return (part * w.unsqueeze(-1)).sum(0).to(out.dtype)
