"""The nvidia backend plugin: Triton kernels (``dsv3.backends.triton_kernels``) plus vendor GEMMs.

Usable with a CUDA GPU (a non-ROCm torch), or anywhere with ``TRITON_INTERPRET=1``, where the
same kernels run through Triton's interpreter on CPU tensors. Importing this module imports
neither triton nor the kernels.
"""

from __future__ import annotations

from dsv3.backends.triton_kernels import ops
from dsv3.hookspecs import CONTRACT_VERSION, BackendInfo, OpRequest, hookimpl
from dsv3.weights import FORMATS


@hookimpl
def dsv3_backend_info() -> BackendInfo:
    return BackendInfo(
        name="nvidia",
        contract_version=CONTRACT_VERSION,
        description="NVIDIA GPUs: Triton kernels (fp8 block-scaled / int8 GEMM, grouped MoE, flash prefill "
        "attention, MLA decode, RMSNorm) with cuBLAS for bf16 and checked cuBLASLt fp8/int8 fast paths",
        device=ops.device(),
        dist_backend="nccl",
        formats=FORMATS,
        unusable_reason=ops.nvidia_unusable_reason(),
        extra={"fp8_dtype": "float8_e4m3fn", "interpreter": ops.interpreting()},
    )


def _op(name: str, request: OpRequest):
    return ops.resolve(name, request, vendor_gemms=True)


@hookimpl
def dsv3_op_rms_norm(request: OpRequest):
    return _op("rms_norm", request)


@hookimpl
def dsv3_op_attention(request: OpRequest):
    return _op("attention", request)


@hookimpl
def dsv3_op_mla_latent_attention(request: OpRequest):
    return _op("mla_latent_attention", request)


@hookimpl
def dsv3_op_linear(request: OpRequest):
    return _op("linear", request)


@hookimpl
def dsv3_op_dequantize(request: OpRequest):
    return _op("dequantize", request)


@hookimpl
def dsv3_op_moe_experts(request: OpRequest):
    return _op("moe_experts", request)


@hookimpl
def dsv3_op_silu_and_mul(request: OpRequest):
    return _op("silu_and_mul", request)
