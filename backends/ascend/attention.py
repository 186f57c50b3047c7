"""MLA attention (naive and weight-absorbed) through ``torch_npu.npu_fused_infer_attention_score``.

The fused operator (FIA) is called in its general form: layout BSND, an explicit boolean mask
(True = masked) carrying each row's causal limit ``j <= q_pos[b, t]``, ``sparse_mode=0``. Its
documented limits shape the calls:

- key and value must have the same shape, and the head dim D must be 16-aligned for fp16/bf16:
  q, k and v are zero-padded to one common D (zeros add nothing to q.k; the extra output columns
  of the padded v are dropped);
- D <= 512, query heads <= 256, query heads / kv heads <= 64: larger shapes (the 671B absorbed
  form has D = 512 + 64) run cpu_ref's PyTorch instead, with a warning;
- query is fp16 or bf16 only (the plugin declines a float32 model at resolution).

The absorbed form is multi-query attention over one latent head: query ``[q_latent, q_pe]``,
key = value = ``[kv, pe]`` (B, S, 1, C + R); the first C output columns are ``sum_j p_j kv_j``.
FIA's dedicated MLA mode (query_rope/key_rope, D = 512, paged KV cache) is not used yet.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.backends.cpu_ref import attention as ref

from .fallback import warn_fallback

ALIGN = 16
MAX_HEAD_DIM = 512
MAX_HEADS = 256
MAX_GROUP = 64
FIA = "npu_fused_infer_attention_score"


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def causal_mask(q_pos: torch.Tensor, s: int) -> torch.Tensor:
    """q_pos (B, T) -> atten_mask (B, 1, T, S) bool, True where key j > q_pos (not attended)."""
    keys = torch.arange(s, device=q_pos.device)
    return (keys.view(1, 1, s) > q_pos.unsqueeze(-1)).unsqueeze(1)


def _pad_to(t: torch.Tensor, d: int) -> torch.Tensor:
    """Zero-pad the last dim to d; always contiguous (FIA takes no strided tensors)."""
    return F.pad(t, (0, d - t.shape[-1])) if t.shape[-1] != d else t.contiguous()


def _misfit(dtype: torch.dtype, d: int, heads: int, kv_heads: int) -> str | None:
    if dtype not in (torch.float16, torch.bfloat16):
        return f"{dtype} queries"
    if d > MAX_HEAD_DIM:
        return f"head dim {d} (> {MAX_HEAD_DIM})"
    if heads > MAX_HEADS or heads // kv_heads > MAX_GROUP:
        return f"{heads} query heads over {kv_heads} kv heads"
    return None


def attention_with(tn):
    def attention(q, k, v, q_pos, scale: float) -> torch.Tensor:
        """q (B, T, H, Dqk), k (B, S, H, Dqk), v (B, S, H, Dv), q_pos (B, T) -> (B, T, H, Dv) q.dtype."""
        h, dv = q.shape[2], v.shape[-1]
        d = _round_up(max(q.shape[-1], dv), ALIGN)
        why = _misfit(q.dtype, d, h, h)
        if why is not None:
            warn_fallback("attention", FIA, why)
            return ref.attention(q, k, v, q_pos, scale)
        out, _ = tn.npu_fused_infer_attention_score(
            _pad_to(q, d),
            _pad_to(k, d),
            _pad_to(v, d),
            atten_mask=causal_mask(q_pos, k.shape[1]),
            num_heads=h,
            num_key_value_heads=h,
            scale=scale,
            input_layout="BSND",
            sparse_mode=0,
        )  # (B, T, H, d)
        return out[..., :dv]

    return attention


def mla_latent_attention_with(tn):
    def mla_latent_attention(q_latent, q_pe, kv, pe, q_pos, scale: float) -> torch.Tensor:
        """q_latent (B, T, H, C), q_pe (B, T, H, R), kv (B, S, C), pe (B, S, R), q_pos (B, T) -> (B, T, H, C)."""
        b, t, h, c = q_latent.shape
        r = q_pe.shape[-1]
        d = _round_up(c + r, ALIGN)
        why = _misfit(q_latent.dtype, d, h, 1)
        if why is not None:
            warn_fallback("mla_latent_attention", FIA, why)
            return ref.mla_latent_attention(q_latent, q_pe, kv, pe, q_pos, scale)
        query = q_latent.new_zeros(b, t, h, d)  # [q_latent | q_pe | 0]
        query[..., :c] = q_latent
        query[..., c : c + r] = q_pe
        key = kv.new_zeros(b, kv.shape[1], 1, d)  # (B, S, 1, d): [kv | pe | 0], also the value
        key[..., 0, :c] = kv
        key[..., 0, c : c + r] = pe
        out, _ = tn.npu_fused_infer_attention_score(
            query,
            key,
            key,
            atten_mask=causal_mask(q_pos, kv.shape[1]),
            num_heads=h,
            num_key_value_heads=1,
            scale=scale,
            input_layout="BSND",
            sparse_mode=0,
        )  # (B, T, H, d)
        return out[..., :c]

    return mla_latent_attention
