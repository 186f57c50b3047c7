"""The operator implementations the nvidia and amd plugins hand out, and one builder per operator.

``build_<op>(request, target)`` returns the implementation of one operator hook for an
:class:`~dsv3.hookspecs.OpRequest` on a :class:`~.target.TritonTarget`, or None to decline; its
docstring says when it declines. The plugins' hooks (``plugin_hooks.TritonBackend``) call them.

Nothing here imports triton when the module is imported or when a builder is asked: the kernel
modules are imported on the first call of an operator. So ``dsv3 backends`` can list what the GPU
backends implement on a machine with neither a GPU nor triton.

Vendor fast paths (chosen once per device, each checked against the Triton kernel on a small
problem before it is trusted): high-precision linears use the vendor BLAS (``F.linear``); on
NVIDIA, FP8 block-scaled GEMMs with M >= ``FAST_MIN_M`` may use ``torch._scaled_mm`` with
1 x 128 / 128 x 128 block scales (cuBLASLt, Hopper, CUDA >= 12.9), and INT8 GEMMs ``torch._int_mm``.
``DSV3_FP8_GEMM`` / ``DSV3_INT8_GEMM``, read when the operator is built: ``auto`` (default: vendor
GEMM for M >= FAST_MIN_M), ``vendor`` (vendor GEMM for every M its library accepts), ``triton``.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import types
from collections.abc import Callable

import torch
import torch.nn.functional as F

from dsv3.hookspecs import (
    AttentionOp,
    DequantizeOp,
    LinearOp,
    MlaLatentAttentionOp,
    MlaPagedAttentionOp,
    MoeExpertsOp,
    OpRequest,
    PagedCacheWriteOp,
    RmsNormOp,
    SiluAndMulOp,
)
from dsv3.weights import FORMATS, FP8_BLOCK, HP, INT8_W8A8, Weight

from .runtime import HP_DTYPES, interpreting, is_hip
from .target import AMD, TritonTarget

FAST_MIN_M = 64  # below this the Triton kernels (split-K for thin problems) are expected to win
FAST_ENV = {"fp8": "DSV3_FP8_GEMM", "int8": "DSV3_INT8_GEMM"}


# ----------------------------------------------------------------------------- usability
def triton_unusable_reason() -> str | None:
    """None when triton imports, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken triton install must not take the CLI down
        return f"triton failed to import: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
    return None


def unusable_reason(target: TritonTarget) -> str | None:
    """None when ``target``'s backend runs here (its torch build and a GPU, or the interpreter, and triton), else why not."""
    if interpreting():
        return triton_unusable_reason()
    if target.rocm and not is_hip():
        return "this torch is not a ROCm build (torch.version.hip is None) and TRITON_INTERPRET is not set"
    if is_hip() and not target.rocm:
        return f"this torch is a ROCm build (torch.version.hip is set): use --backend {AMD.name}"
    if not torch.cuda.is_available():
        return f"no {target.gpu} visible (torch.cuda.is_available() is False) and TRITON_INTERPRET is not set"
    return triton_unusable_reason()


def device() -> str:
    """Where a GPU backend's tensors live: the CPU under the interpreter, else the GPU."""
    return "cpu" if interpreting() else "cuda"


def fp8_dot_supported() -> bool:
    """FP8 tensor-core products: interpreter, NVIDIA sm_89+, AMD MI300 (gfx94x) and later.

    Without a GPU the answer is True: an unusable backend lists everything it implements.
    """
    if interpreting() or not torch.cuda.is_available():
        return True
    return _gpu_has_fp8()


@functools.cache
def _gpu_has_fp8() -> bool:
    if is_hip():
        return _gpu_arch().startswith(("gfx94", "gfx95", "gfx12"))
    return torch.cuda.get_device_capability(0) >= (8, 9)


@functools.cache
def _gpu_arch() -> str:
    """The AMD architecture name of GPU 0 (``gfx942:sramecc+:xnack-``); "" on NVIDIA."""
    return getattr(torch.cuda.get_device_properties(0), "gcnArchName", "")


def fp8_compute_dtype(target: TritonTarget) -> torch.dtype:
    """The fp8 dtype ``fp8_block`` weights are computed in on ``target`` here.

    Under the interpreter: the target's own (so CI runs the path its GPUs take). Without the
    target's GPU, or on an architecture ``target.fp8_dtype_archs`` leaves out: e4m3fn.
    """
    if interpreting():
        return target.fp8_dtype
    if is_hip() != target.rocm or not torch.cuda.is_available():
        return torch.float8_e4m3fn
    if target.fp8_dtype_archs and not _gpu_arch().startswith(target.fp8_dtype_archs):
        return torch.float8_e4m3fn
    return target.fp8_dtype


@functools.cache
def _k() -> types.SimpleNamespace:
    """The kernel modules, imported on first use."""
    from . import attention, dequant, gemm, mla, moe, norm, paged, quant

    return types.SimpleNamespace(
        attention=attention, dequant=dequant, gemm=gemm, mla=mla, moe=moe, norm=norm, paged=paged, quant=quant
    )


# ----------------------------------------------------------------------------- vendor fast paths
def _scaled_mm_fp8_block(qa, sa, wq, sw, out_dtype):
    """torch._scaled_mm with DeepSeek block scales: a (M, K) 1 x 128 groups, b (N, K) 128 x 128 blocks."""
    m = qa.shape[0]
    pad = (-m) % 4  # cuBLASLt wants M a multiple of 4
    if pad:
        qa = F.pad(qa.view(torch.uint8), (0, 0, 0, pad)).view(qa.dtype)
        sa = F.pad(sa, (0, 0, 0, pad), value=1.0)
    scale_a = sa.t().contiguous().t()  # (M, K/128), M-major
    scale_b = sw.t()  # (K/128, N/128), K-major
    y = torch._scaled_mm(qa, wq.t(), scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype)
    return y[:m] if pad else y


def _int_mm_int8(qa, sa, wq, sw, out_dtype):
    """torch._int_mm (cuBLASLt int8, int32 out) then the per-token x per-channel scales."""
    acc = torch._int_mm(qa, wq.t())
    return (acc.float() * sa.unsqueeze(-1) * sw).to(out_dtype)


def _fast_ok_shape(kind: str, m: int, n: int, k: int, min_m: int = FAST_MIN_M) -> bool:
    if kind == "fp8":  # K in whole groups of 4 blocks: cuBLASLt's layout of the block scales
        return m >= min_m and n % 128 == 0 and k % 512 == 0
    return m >= max(min_m, 17) and n % 8 == 0 and k % 8 == 0  # torch._int_mm needs M > 16


def vendor_min_m(kind: str) -> int | None:
    """The smallest M given to the vendor GEMM of ``kind`` under DSV3_FP8_GEMM / DSV3_INT8_GEMM (None: never)."""
    choice = os.environ.get(FAST_ENV[kind], "auto").strip().lower()
    return {"auto": FAST_MIN_M, "vendor": 1}.get(choice)


def fast_path_status(kind: str, index: int = 0) -> tuple[bool, str]:
    """Whether the vendor GEMM for ``kind`` ("fp8" or "int8") is trusted on GPU ``index``, and why.

    Runs it once on a small problem and compares with the Triton kernel (relative error < 1e-2).
    """
    choice = os.environ.get(FAST_ENV[kind], "auto").strip().lower()
    if choice == "triton":
        return False, f"{FAST_ENV[kind]}=triton"
    if choice not in ("auto", "vendor"):
        return False, f"{FAST_ENV[kind]}={choice!r} is not one of triton, vendor, auto"
    if interpreting() or not torch.cuda.is_available() or is_hip():
        return False, "vendor GEMM fast paths are used on NVIDIA GPUs only"
    return _probe_fast_path(kind, index)


@functools.cache
def _probe_fast_path(kind: str, index: int) -> tuple[bool, str]:
    if kind == "fp8" and torch.cuda.get_device_capability(index) != (9, 0):
        return False, "torch._scaled_mm block scales are implemented for sm_90 only"
    k = _k()
    dev = torch.device("cuda", index)
    g = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(64, 1024, device=dev, generator=g, dtype=torch.bfloat16)
    w = torch.randn(256, 1024, device=dev, generator=g) * 0.05
    try:
        if kind == "fp8":
            from dsv3.backends.cpu_ref.quant import quantize_weight_fp8

            wt = quantize_weight_fp8(w)
            qa, sa = k.quant.act_quant_fp8(x)
            want = k.gemm.fp8_block_gemm(qa, sa, wt.data, wt.scale, torch.bfloat16)
            got = _scaled_mm_fp8_block(qa, sa, wt.data, wt.scale, torch.bfloat16)
        else:
            from dsv3.backends.cpu_ref.quant import quantize_weight_int8

            wt = quantize_weight_int8(w)
            qa, sa = k.quant.act_quant_int8(x)
            want = k.gemm.int8_gemm(qa, sa, wt.data, wt.scale, torch.bfloat16)
            got = _int_mm_int8(qa, sa, wt.data, wt.scale, torch.bfloat16)
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
    except Exception as exc:
        return False, f"vendor GEMM failed its check: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    if not err < 1e-2:
        return False, f"vendor GEMM disagrees with the Triton kernel (relative error {err:.2e})"
    return True, f"checked against the Triton kernel (relative error {err:.2e})"


def fp8_gemm(qa, sa, wq, sw, out_dtype, min_m: int | None):
    """(M, K) fp8 x (N, K) fp8 with block scales -> (M, N) out_dtype; the vendor GEMM from M >= min_m."""
    m, n, kk = qa.shape[0], wq.shape[0], qa.shape[1]
    if (
        min_m is not None
        and _fast_ok_shape("fp8", m, n, kk, min_m)
        and fast_path_status("fp8", qa.device.index or 0)[0]
    ):
        return _scaled_mm_fp8_block(qa, sa, wq, sw, out_dtype)
    return _k().gemm.fp8_block_gemm(qa, sa, wq, sw, out_dtype)


def int8_gemm(qa, sa, wq, sw, out_dtype, min_m: int | None):
    """(M, K) int8 x (N, K) int8 with per-token / per-channel scales -> (M, N); the vendor GEMM from M >= min_m."""
    m, n, kk = qa.shape[0], wq.shape[0], qa.shape[1]
    if (
        min_m is not None
        and _fast_ok_shape("int8", m, n, kk, min_m)
        and fast_path_status("int8", qa.device.index or 0)[0]
    ):
        return _int_mm_int8(qa, sa, wq, sw, out_dtype)
    return _k().gemm.int8_gemm(qa, sa, wq, sw, out_dtype)


# ----------------------------------------------------------------------------- operators
def linear_hp(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x (..., in), w hp (out, in) -> (..., out): the vendor BLAS."""
    return F.linear(x, w.data)


def linear_weight_only(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x (..., in) compute dtype, w quantized (out, in) -> (..., out): weight dequantized in registers."""
    y = _k().gemm.weight_gemm(x.reshape(-1, x.shape[-1]), w.data, w.scale, w.fmt)
    return y.view(*x.shape[:-1], w.out_features)


def make_linear_dynamic(fmt: str, vendor: bool) -> Callable:
    """Linear with activations quantized at run time (fp8 1 x 128 groups or int8 per token).

    vendor: may use the vendor GEMM (from the M that DSV3_FP8_GEMM / DSV3_INT8_GEMM give, read now).
    """
    min_m = vendor_min_m("fp8" if fmt == FP8_BLOCK else "int8") if vendor else None

    def linear_fp8_dynamic(x: torch.Tensor, w: Weight) -> torch.Tensor:
        """x (..., in) -> (..., out): per-token-per-128 fp8 activations, block-scaled fp8 GEMM, fp32 sums."""
        qa, sa = _k().quant.act_quant_fp8(x.reshape(-1, x.shape[-1]), w.data.dtype, w.scale_fmt)
        y = fp8_gemm(qa, sa, w.data, w.scale, x.dtype, min_m)
        return y.view(*x.shape[:-1], w.out_features)

    def linear_int8_dynamic(x: torch.Tensor, w: Weight) -> torch.Tensor:
        """x (..., in) -> (..., out): per-token int8 activations, int8 GEMM with exact int32 sums."""
        qa, sa = _k().quant.act_quant_int8(x.reshape(-1, x.shape[-1]))
        y = int8_gemm(qa, sa, w.data, w.scale, x.dtype, min_m)
        return y.view(*x.shape[:-1], w.out_features)

    return linear_fp8_dynamic if fmt == FP8_BLOCK else linear_int8_dynamic


def dequantize(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    """w (..., out, in) any format -> (..., out, in) dtype."""
    if w.fmt == HP:
        return w.data.to(dtype)
    return _k().dequant.dequantize_weight(w.data, w.scale, w.fmt, dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x (..., D), weight (D,) -> (..., D) x.dtype."""
    return _k().norm.rms_norm(x, weight, eps)


def silu_and_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """gate, up (..., I) -> silu(gate) * up."""
    return _k().norm.silu_and_mul(gate, up)


def attention(q, k, v, q_pos, scale: float) -> torch.Tensor:
    """q (B, T, H, Dqk), k (B, S, H, Dqk), v (B, S, H, Dv), q_pos (B, T) -> (B, T, H, Dv): flash-style prefill."""
    return _k().attention.attention(q, k, v, q_pos, scale)


def mla_latent_attention(q_latent, q_pe, kv, pe, q_pos, scale: float) -> torch.Tensor:
    """q_latent (B, T, H, C), q_pe (B, T, H, R), kv (B, S, C), pe (B, S, R), q_pos (B, T) -> (B, T, H, C)."""
    return _k().mla.mla_latent_attention(q_latent, q_pe, kv, pe, q_pos, scale)


def paged_cache_write(cache, kv, pe, slot_mapping) -> None:
    """cache (P, page_size, C + R) in place <- concat(kv (N, C), pe (N, R)) at slot_mapping (N,); < 0: skipped."""
    _k().paged.paged_cache_write(cache, kv, pe, slot_mapping)


def mla_paged_attention(q_latent, q_pe, cache, block_table, seq_lens, scale: float) -> torch.Tensor:
    """q_latent (B, T, H, C), q_pe (B, T, H, R), cache (P, page_size, C + R), block_table (B, M), seq_lens (B,)
    -> (B, T, H, C): MLA decode / chunked prefill through the block table."""
    return _k().paged.mla_paged_attention(q_latent, q_pe, cache, block_table, seq_lens, scale)


def make_moe_experts(act_quant: str) -> Callable:
    def moe_experts(x, weights, ids, w1: Weight, w3: Weight, w2: Weight, expert_offset: int = 0) -> torch.Tensor:
        """x (N, D), weights/ids (N, k), w1/w3 (E, I, D), w2 (E, D, I) -> (N, D): grouped GEMMs by expert."""
        return _k().moe.moe_experts(x, weights, ids, w1, w3, w2, expert_offset, act_quant)

    return moe_experts


# ----------------------------------------------------------------------------- builders
# Embedding, rotary, the MoE gate and sampling have none: cpu_ref's torch ops run on the GPU.
def build_rms_norm(request: OpRequest, target: TritonTarget) -> RmsNormOp | None:
    """The RMSNorm kernel. Declines a weight format outside ``dsv3.weights.FORMATS``."""
    return rms_norm if request.fmt in FORMATS else None


def build_silu_and_mul(request: OpRequest, target: TritonTarget) -> SiluAndMulOp | None:
    """The SiLU-and-multiply kernel. Declines a weight format outside ``FORMATS``."""
    return silu_and_mul if request.fmt in FORMATS else None


def build_attention(request: OpRequest, target: TritonTarget) -> AttentionOp | None:
    """Flash-style prefill attention (the naive MLA form). Declines a weight format outside ``FORMATS``."""
    return attention if request.fmt in FORMATS else None


def build_mla_latent_attention(request: OpRequest, target: TritonTarget) -> MlaLatentAttentionOp | None:
    """MLA decode over the latent cache. Declines a weight format outside ``FORMATS``."""
    return mla_latent_attention if request.fmt in FORMATS else None


def build_paged_cache_write(request: OpRequest, target: TritonTarget) -> PagedCacheWriteOp | None:
    """Stores tokens at their slots of the paged latent cache. Declines a weight format outside ``FORMATS``
    and a compute dtype outside float32 / bfloat16 / float16 (e.g. an fp8 cache)."""
    return paged_cache_write if request.fmt in FORMATS and request.dtype in HP_DTYPES else None


def build_mla_paged_attention(request: OpRequest, target: TritonTarget) -> MlaPagedAttentionOp | None:
    """MLA attention through the block table of the paged latent cache. Declines a weight format outside
    ``FORMATS`` and a compute dtype outside float32 / bfloat16 / float16 (e.g. an fp8 cache)."""
    return mla_paged_attention if request.fmt in FORMATS and request.dtype in HP_DTYPES else None


def build_dequantize(request: OpRequest, target: TritonTarget) -> DequantizeOp | None:
    """Weight dequantization (any format of ``FORMATS``). Declines a weight format outside ``FORMATS``."""
    return dequantize if request.fmt in FORMATS else None


def _quantized_dynamic(request: OpRequest) -> bool:
    return request.act_quant == "dynamic" and request.fmt in (FP8_BLOCK, INT8_W8A8)


def build_linear(request: OpRequest, target: TritonTarget) -> LinearOp | None:
    """hp: the vendor BLAS. fp8_block / int8_w8a8 with act_quant "dynamic": activations quantized
    at run time and a quantized GEMM (the vendor's too where ``target.vendor_gemms``). Other
    quantized requests: the weight dequantized in registers.

    Declines a weight format outside ``FORMATS``, and fp8_block with dynamic activations on a GPU
    without fp8 tensor cores (``fp8_dot_supported()`` False: cpu_ref emulates it).
    """
    if request.fmt not in FORMATS:
        return None
    if request.fmt == HP:
        return linear_hp
    if not _quantized_dynamic(request):
        return linear_weight_only
    if request.fmt == FP8_BLOCK and not fp8_dot_supported():
        return None
    return make_linear_dynamic(request.fmt, target.vendor_gemms)


def build_moe_experts(request: OpRequest, target: TritonTarget) -> MoeExpertsOp | None:
    """Grouped GEMMs by expert, every format; activations quantized as ``build_linear``'s.

    Declines a weight format outside ``FORMATS``, and fp8_block with dynamic activations on a GPU
    without fp8 tensor cores.
    """
    if request.fmt not in FORMATS:
        return None
    dynamic = _quantized_dynamic(request)
    if dynamic and request.fmt == FP8_BLOCK and not fp8_dot_supported():
        return None
    return make_moe_experts(request.act_quant if dynamic else "none")


def prepare_weight(w: Weight, target: TritonTarget) -> Weight | None:
    """An e4m3fn fp8_block weight as e4m3fnuz where ``target`` computes that here (MI300); else None (unchanged)."""
    if w.fmt != FP8_BLOCK or w.data.dtype != torch.float8_e4m3fn:
        return None
    if fp8_compute_dtype(target) != torch.float8_e4m3fnuz:
        return None
    return e4m3fn_to_e4m3fnuz(w)


def e4m3fn_to_e4m3fnuz(w: Weight) -> Weight:
    """An e4m3fn fp8_block weight as e4m3fnuz (MI300): same bits except 0x80 (-0 in fn, NaN in fnuz) -> 0
    and fn's NaNs 0x7F / 0xFF (+-240 in fnuz) -> 0x80, fnuz's NaN (the non-finite rule, ``dsv3.weights``).

    The fnuz exponent bias is one larger, so the same bits mean half the value: the scales double.
    """
    bits = w.data.view(torch.uint8)
    bits = torch.where(bits == 0x80, torch.zeros_like(bits), bits)
    bits = torch.where((bits & 0x7F) == 0x7F, torch.full_like(bits, 0x80), bits)
    return Weight(bits.view(torch.float8_e4m3fnuz), w.fmt, w.scale * 2.0, w.block_size, w.scale_fmt)
