"""TEST STAND-IN for torch_npu. Not torch_npu, not Huawei code, never used at run time.

dsv3's ascend backend imports ``torch_npu`` lazily. The ascend tests put this directory on
``sys.modules`` (in-process) or ``PYTHONPATH`` (subprocesses) so that, on a machine without an
NPU, the plugin's real code path runs against these plain-PyTorch implementations of the
torch_npu operators it uses. Each follows the operator's documented semantics (the formulas and
"equivalent computation logic" of the torch_npu API reference; docs/ascend.md names the versions)
and rejects the documented input limits the plugin must respect, so a wiring mistake that real
torch_npu would reject fails here too. On a machine with torch_npu the tests use the real one.

Besides the operators it provides what the plugin's seam (dsv3.backends.ascend.npu) asks for:
``npu.is_available()`` / ``npu.device_count()`` (one device, or ``DSV3_STANDIN_NPU_COUNT``) and
``DEVICE_TYPE = "cpu"``: its "NPU tensors" are CPU tensors. ``CALLS`` counts operator calls so the
tests can check which operators ran.
"""

from __future__ import annotations

import os
from collections import Counter
from types import SimpleNamespace

import torch

__version__ = "0.0+dsv3.test.standin"
DEVICE_TYPE = "cpu"
CALLS: Counter = Counter()
HALF = (torch.float16, torch.bfloat16)


def _device_count() -> int:
    return int(os.environ.get("DSV3_STANDIN_NPU_COUNT", "1"))


npu = SimpleNamespace(is_available=lambda: _device_count() > 0, device_count=_device_count)


def _check(cond: bool, op: str, what: str) -> None:
    if not cond:
        raise RuntimeError(f"{op}: {what} (outside the documented limits)")


# ---------------------------------------------------------------- npu_rms_norm
def npu_rms_norm(self: torch.Tensor, gamma: torch.Tensor, epsilon: float = 1e-6):
    """``npu_rms_norm(Tensor self, Tensor gamma, float epsilon=1e-06) -> (Tensor, Tensor)``.

    y = x * rstd * gamma with rstd = 1 / sqrt(mean(x^2) + eps) over the last dim; returns (y, rstd).
    fp16/bf16/fp32, 2..8 dims, gamma of x's dtype.
    """
    op = "npu_rms_norm"
    CALLS[op] += 1
    _check(self.dtype in (*HALF, torch.float32) and 2 <= self.dim() <= 8, op, f"self {self.dtype} {self.dim()}-d")
    _check(gamma.dtype == self.dtype and gamma.shape == self.shape[-1:], op, f"gamma {gamma.dtype} {list(gamma.shape)}")
    xf = self.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + epsilon)
    return (xf * rstd * gamma.float()).to(self.dtype), rstd


# ---------------------------------------------------------------- npu_rotary_mul
def npu_rotary_mul(input: torch.Tensor, r1: torch.Tensor, r2: torch.Tensor, rotary_mode: str = "half"):
    """``npu_rotary_mul(input, r1, r2, rotary_mode='half') -> Tensor``: ``r1 * x + r2 * rotate(x)``.

    half: rotate(x) = cat(-x2, x1) of the two halves; interleave: each pair (a, b) -> (-b, a).
    4-d input; interleave mode: D even and < 896, and for a BSND input r1/r2 of shape (1, S, 1, D).
    """
    op = "npu_rotary_mul"
    CALLS[op] += 1
    _check(input.dim() == 4 and r1.shape == r2.shape, op, f"input {list(input.shape)}, r1 {list(r1.shape)}")
    _check(input.dtype in (*HALF, torch.float32), op, f"input {input.dtype}")
    d = input.shape[-1]
    if rotary_mode == "interleave":
        _check(d % 2 == 0 and d < 896, op, f"D = {d}")
        b, s, n, _ = input.shape
        _check(b * n < 1000, op, f"B*N = {b * n}")
        _check(tuple(r1.shape) == (1, s, 1, d), op, f"r1 {list(r1.shape)} for BSND input {list(input.shape)}")
        pairs = input.unflatten(-1, (-1, 2))  # (..., D/2, 2)
        rotated = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    elif rotary_mode == "half":
        x1, x2 = input.chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    else:
        raise RuntimeError(f"{op}: rotary_mode {rotary_mode!r} (half or interleave)")
    return r1 * input + r2 * rotated


# ---------------------------------------------------------------- npu_swiglu
def npu_swiglu(input: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``npu_swiglu(Tensor self, int dim=-1) -> Tensor``: halves A, B along dim, ``silu(A) * B``.

    fp32/fp16/bf16, contiguous, dim of even size; output in input's dtype.
    """
    op = "npu_swiglu"
    CALLS[op] += 1
    _check(input.is_contiguous() and input.shape[dim] % 2 == 0, op, f"input {list(input.shape)} dim {dim}")
    a, b = input.float().chunk(2, dim=dim)
    return (torch.nn.functional.silu(a) * b).to(input.dtype)


# ---------------------------------------------------------------- npu_dynamic_quant
def npu_dynamic_quant(x: torch.Tensor, *, smooth_scales=None, group_index=None, dst_type=None):
    """``npu_dynamic_quant(x, *, smooth_scales=None, group_index=None, dst_type=None) -> (y, scale)``.

    Per-token symmetric: ``scale = row_max(|x|) / 127`` (fp32, x's shape without its last dim),
    ``y = round(x / scale)`` int8. x fp16/bf16 with more than one dim. (An all-zero row is left
    to the implementation by the docs; here it quantizes to zeros with scale 0.)
    """
    op = "npu_dynamic_quant"
    CALLS[op] += 1
    _check(smooth_scales is None and group_index is None and dst_type in (None, torch.int8), op, "smooth/group/int4")
    _check(x.dtype in HALF and x.dim() > 1, op, f"x {x.dtype} {x.dim()}-d")
    xf = x.float()
    scale = xf.abs().amax(dim=-1) / 127.0
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    y = torch.round(xf / safe.unsqueeze(-1)).clamp(-128, 127).to(torch.int8)
    return y, scale


# ---------------------------------------------------------------- npu_quant_matmul
def npu_quant_matmul(
    x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None, output_dtype=None, group_sizes=None
):
    """``npu_quant_matmul(x1, x2, scale, *, offset=None, pertoken_scale=None, bias=None,
    output_dtype=None, group_sizes=None) -> Tensor``.

    Only the case the plugin uses: x1 (m, k) int8 @ x2 (k, n) int8 with int32 accumulation, times
    ``scale`` (n,) fp32/bf16 and ``pertoken_scale`` (m,) fp32, output bf16 (or fp16 with an fp32
    scale); last dims <= 65535.
    """
    op = "npu_quant_matmul"
    CALLS[op] += 1
    _check(x1.dtype == torch.int8 and x2.dtype == torch.int8 and x1.dim() == 2 and x2.dim() == 2, op, "int8 2-d only")
    m, k = x1.shape
    _check(x2.shape[0] == k and max(k, x2.shape[1]) <= 65535, op, f"x1 {list(x1.shape)} @ x2 {list(x2.shape)}")
    n = x2.shape[1]
    _check(offset is None and bias is None and group_sizes is None, op, "offset/bias/group_sizes")
    _check(scale.dim() == 1 and scale.shape[0] in (1, n), op, f"scale {list(scale.shape)}")
    _check(pertoken_scale is not None and tuple(pertoken_scale.shape) == (m,), op, "pertoken_scale (m,)")
    _check(pertoken_scale.dtype == torch.float32, op, f"pertoken_scale {pertoken_scale.dtype}")
    ok = (output_dtype == torch.bfloat16 and scale.dtype in (torch.float32, torch.bfloat16)) or (
        output_dtype == torch.float16 and scale.dtype == torch.float32
    )
    _check(ok, op, f"output_dtype {output_dtype} with a {scale.dtype} scale")
    acc = x1.double() @ x2.double()  # every int32 sum of int8 products is exact in float64
    return (acc * scale.double() * pertoken_scale.double().unsqueeze(-1)).to(output_dtype)


# ---------------------------------------------------------------- npu_grouped_matmul
def npu_grouped_matmul(
    x,
    weight,
    *,
    bias=None,
    scale=None,
    offset=None,
    antiquant_scale=None,
    antiquant_offset=None,
    per_token_scale=None,
    group_list=None,
    activation_input=None,
    activation_quant_scale=None,
    activation_quant_offset=None,
    split_item=0,
    group_type=None,
    group_list_type=0,
    act_type=0,
    output_dtype=None,
    tuning_config=None,
):
    """``npu_grouped_matmul(x, weight, *, ..., group_list, split_item, group_type, group_list_type,
    output_dtype) -> List[Tensor]``, single-x / single-weight / single-y with m-axis groups only:

    x [(M, K)], weight [(E, K, N)] (a transposed view allowed), group_list (E,) int64 tensor of
    row counts (group_list_type=1) or their cumsum (0), split_item 2 or 3, group_type 0:
    ``y[rows of group i] = x[rows] @ weight[i]`` (unquantized: fp16/bf16/fp32 in, same out), or
    the per-token quantized form ``(x @ weight[i]) * scale[i] * per_token_scale[rows]`` with int8
    x/weight, scale (E, N) bf16 for a bf16 output (fp32 for fp16), per_token_scale (M,) fp32.
    """
    op = "npu_grouped_matmul"
    CALLS[op] += 1
    _check(
        len(x) == 1 and len(weight) == 1 and split_item in (2, 3) and group_type == 0, op, "single tensors, m groups"
    )
    _check(
        bias is None and offset is None and antiquant_scale is None and act_type == 0, op, "bias/offset/antiquant/act"
    )
    a, w = x[0], weight[0]
    _check(a.dim() == 2 and w.dim() == 3 and a.shape[1] == w.shape[1], op, f"x {list(a.shape)} w {list(w.shape)}")
    _check(max(a.shape[1], w.shape[2]) < 65536, op, "inner dims")
    e = w.shape[0]
    _check(
        torch.is_tensor(group_list) and group_list.dtype == torch.int64 and group_list.shape == (e,), op, "group_list"
    )
    _check(e <= 1024, op, f"{e} groups")
    counts = group_list if group_list_type == 1 else torch.diff(group_list, prepend=group_list.new_zeros(1))
    _check(
        group_list_type in (0, 1) and int(counts.sum()) == a.shape[0] and bool((counts >= 0).all()), op, "group sums"
    )
    ends = counts.cumsum(0).tolist()
    starts = [0, *ends[:-1]]
    if scale is None:
        _check(a.dtype in (*HALF, torch.float32) and w.dtype == a.dtype, op, f"x {a.dtype} w {w.dtype}")
        _check(per_token_scale is None and output_dtype in (None, a.dtype), op, "unquantized output dtype")
        out = torch.empty(a.shape[0], w.shape[2], dtype=a.dtype)
        for i, (s0, s1) in enumerate(zip(starts, ends, strict=True)):
            out[s0:s1] = (a[s0:s1].float() @ w[i].float()).to(a.dtype)
        return [out]
    _check(a.dtype == torch.int8 and w.dtype == torch.int8, op, "quantized x/weight must be int8")
    sc, pt = scale[0], per_token_scale[0] if per_token_scale else None
    want = torch.bfloat16 if output_dtype == torch.bfloat16 else torch.float32
    _check(output_dtype in HALF and sc.dtype == want and tuple(sc.shape) == (e, w.shape[2]), op, f"scale {sc.dtype}")
    _check(pt is not None and pt.dtype == torch.float32 and tuple(pt.shape) == (a.shape[0],), op, "per_token_scale")
    out = torch.empty(a.shape[0], w.shape[2], dtype=output_dtype)
    for i, (s0, s1) in enumerate(zip(starts, ends, strict=True)):
        acc = a[s0:s1].double() @ w[i].double()  # exact int32 sums
        out[s0:s1] = (acc * sc[i].double() * pt[s0:s1].double().unsqueeze(-1)).to(output_dtype)
    return [out]


# ---------------------------------------------------------------- npu_moe_gating_top_k
def npu_moe_gating_top_k(
    x,
    k,
    *,
    bias=None,
    k_group=1,
    group_count=1,
    group_select_mode=0,
    renorm=0,
    norm_type=0,
    out_flag=False,
    routed_scaling_factor=1.0,
    eps=1e-20,
):
    """``npu_moe_gating_top_k(x, k, *, bias=None, k_group=1, group_count=1, group_select_mode=0,
    renorm=0, norm_type=0, out_flag=False, routed_scaling_factor=1.0, eps=1e-20) -> (y, idx, norm)``.

    norm = softmax(x) (norm_type 0) or sigmoid(x) (1), in float32; choice = norm + bias; with
    group_count > 1 the groups are ranked by their max (mode 0) or top-2 sum (mode 1) of choice and
    all but the best k_group masked; idx = top-k of choice (int32); y = norm at idx, divided by
    (sum + eps) when norm_type is 1, times routed_scaling_factor, in x's dtype.
    """
    op = "npu_moe_gating_top_k"
    CALLS[op] += 1
    n_exp = x.shape[-1]
    _check(x.dim() == 2 and n_exp <= 2048 and renorm == 0, op, f"x {list(x.shape)}, renorm {renorm}")
    _check(bias is None or (bias.dtype == x.dtype and tuple(bias.shape) == (n_exp,)), op, "bias dtype/shape")
    per = n_exp // group_count
    _check(n_exp % group_count == 0 and per > 2 and -(-per // 32) * 32 * group_count <= 2048, op, "group_count")
    _check(1 <= k_group <= group_count and 1 <= k <= per * k_group, op, f"k {k}, k_group {k_group}")
    xf = x.float()
    norm = xf.sigmoid() if norm_type == 1 else xf.softmax(dim=-1)
    choice = norm if bias is None else norm + bias.float()
    if group_count > 1:
        grouped = choice.view(x.shape[0], group_count, per)
        if group_select_mode == 0:
            score = grouped.amax(dim=-1)
        else:
            score = grouped.topk(2, dim=-1).values.sum(dim=-1)
        best = torch.argsort(-score, dim=-1, stable=True)[:, :k_group]
        keep = torch.zeros_like(score, dtype=torch.bool).scatter_(1, best, True)
        choice = grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).flatten(1)
    idx = torch.argsort(-choice, dim=-1, stable=True)[:, :k]
    y = norm.gather(1, idx)
    if norm_type == 1:
        y = y / (y.sum(dim=-1, keepdim=True) + eps)
    y = y * routed_scaling_factor
    return y.to(x.dtype), idx.to(torch.int32), norm if out_flag else None


# ---------------------------------------------------------------- npu_fused_infer_attention_score
def npu_fused_infer_attention_score(
    query,
    key,
    value,
    *,
    atten_mask=None,
    num_heads=1,
    scale=1.0,
    input_layout="BSH",
    num_key_value_heads=0,
    sparse_mode=0,
    inner_precise=0,
    softmax_lse_flag=False,
    **unused,
):
    """``npu_fused_infer_attention_score(query, key, value, *, ..., atten_mask, ..., num_heads,
    scale, ..., input_layout, num_key_value_heads, sparse_mode, ...) -> (attention_out, softmax_lse)``.

    Only what the plugin uses: layout BSND, sparse_mode 0 with a full bool atten_mask
    (B, 1, Q_S, KV_S) where True masks a position out, GQA by num_key_value_heads, no
    quantization / paging / rope inputs. ``out = softmax(scale * q k^T, masked) v`` per head,
    query head h reading kv head ``h // (num_heads / num_key_value_heads)``, softmax in float32.
    Limits: fp16/bf16 contiguous q/k/v, key and value of one shape, D 16-aligned and <= 512,
    N <= 256, num_heads / num_key_value_heads <= 64.
    """
    op = "npu_fused_infer_attention_score"
    CALLS[op] += 1
    _check(not any(v is not None for v in unused.values()), op, f"unsupported inputs {sorted(unused)}")
    _check(input_layout == "BSND" and sparse_mode == 0 and not softmax_lse_flag, op, f"layout {input_layout}")
    _check(query.dtype in HALF and key.dtype == query.dtype and value.dtype == query.dtype, op, f"q {query.dtype}")
    _check(query.is_contiguous() and key.is_contiguous() and value.is_contiguous(), op, "non-contiguous q/k/v")
    _check(key.shape == value.shape, op, f"key {list(key.shape)} != value {list(value.shape)}")
    b, t, h, d = query.shape
    kvh = num_key_value_heads or num_heads
    _check(h == num_heads and key.shape[2] == kvh and h % kvh == 0 and h // kvh <= 64 and h <= 256, op, "heads")
    _check(key.shape[0] == b and key.shape[3] == d and d % 16 == 0 and d <= 512, op, f"D = {d}")
    s = key.shape[1]
    _check(atten_mask is not None and atten_mask.dtype == torch.bool, op, "atten_mask must be a bool tensor")
    _check(tuple(atten_mask.shape) == (b, 1, t, s), op, f"atten_mask {list(atten_mask.shape)}")
    k_full = key.float().repeat_interleave(h // kvh, dim=2)  # (B, S, H, D)
    v_full = value.float().repeat_interleave(h // kvh, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", query.float(), k_full) * scale
    probs = scores.masked_fill(atten_mask, float("-inf")).softmax(dim=-1)
    out = torch.einsum("bhts,bshd->bthd", probs, v_full).to(query.dtype)
    return out, torch.zeros(1)
