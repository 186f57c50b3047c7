"""The amd backend plugin: the shared Triton kernels (``dsv3.backends.triton_kernels``) on ROCm.

MI300-class GPUs (gfx94x) compute fp8 in ``float8_e4m3fnuz`` (max 240, no negative zero). Released
fp8 checkpoints are e4m3fn, so ``prepare_weight`` converts each fp8_block weight once at load
(bits kept, 0x80 -> 0, scales doubled) and activations are then quantized with the fnuz range,
because the kernels take the fp8 dtype from the weight. Usable under ROCm, or anywhere with
``TRITON_INTERPRET=1`` (CPU tensors through Triton's interpreter; the conversion is applied there
too, so the fnuz path is what CI checks). Importing this module imports neither triton nor the kernels.
"""

from __future__ import annotations

import functools

import torch

from dsv3.backends.triton_kernels import ops
from dsv3.hookspecs import CONTRACT_VERSION, BackendInfo, OpRequest, hookimpl
from dsv3.weights import FORMATS, FP8_BLOCK, Weight


def _wants_fnuz() -> bool:
    """MI300 (gfx94x) needs e4m3fnuz; MI350 (gfx950) computes the OCP e4m3fn format directly."""
    if ops.interpreting():
        return True
    if torch.version.hip is None or not torch.cuda.is_available():
        return False
    return _gpu_is_gfx94()


@functools.cache
def _gpu_is_gfx94() -> bool:
    return getattr(torch.cuda.get_device_properties(0), "gcnArchName", "").startswith("gfx94")


def prepare_weight(w: Weight) -> Weight | None:
    """e4m3fn fp8_block weights -> e4m3fnuz with doubled scales where the GPU needs it; else None (unchanged)."""
    if w.fmt != FP8_BLOCK or w.data.dtype != torch.float8_e4m3fn or not _wants_fnuz():
        return None
    return ops.e4m3fn_to_e4m3fnuz(w)


@hookimpl
def dsv3_backend_info() -> BackendInfo:
    return BackendInfo(
        name="amd",
        contract_version=CONTRACT_VERSION,
        description="AMD GPUs (ROCm): Triton kernels (fp8 block-scaled in e4m3fnuz on MI300 / int8 GEMM, "
        "grouped MoE, flash prefill attention, MLA decode, RMSNorm) with hipBLASLt for bf16",
        device=ops.device(),
        dist_backend="nccl",  # RCCL under ROCm builds of torch
        formats=FORMATS,
        unusable_reason=ops.amd_unusable_reason(),
        prepare_weight=prepare_weight,
        extra={"fp8_dtype": "float8_e4m3fnuz (MI300) / float8_e4m3fn", "interpreter": ops.interpreting()},
    )


@hookimpl
def dsv3_op_rms_norm(request: OpRequest):
    return ops.resolve("rms_norm", request)


@hookimpl
def dsv3_op_attention(request: OpRequest):
    return ops.resolve("attention", request)


@hookimpl
def dsv3_op_mla_latent_attention(request: OpRequest):
    return ops.resolve("mla_latent_attention", request)


@hookimpl
def dsv3_op_linear(request: OpRequest):
    return ops.resolve("linear", request)


@hookimpl
def dsv3_op_dequantize(request: OpRequest):
    return ops.resolve("dequantize", request)


@hookimpl
def dsv3_op_moe_experts(request: OpRequest):
    return ops.resolve("moe_experts", request)


@hookimpl
def dsv3_op_silu_and_mul(request: OpRequest):
    return ops.resolve("silu_and_mul", request)
