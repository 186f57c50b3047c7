"""The nvidia backend plugin: Triton kernels (``dsv3.backends.triton_kernels``) plus vendor GEMMs.

Usable with a CUDA GPU (a non-ROCm torch), or anywhere with ``TRITON_INTERPRET=1``, where the
same kernels run through Triton's interpreter on CPU tensors. The operator hooks are amd's too
(``TritonBackend``); only the target differs (``triton_kernels.target.NVIDIA``). Importing this
module imports neither triton nor the kernels.
"""

from __future__ import annotations

from dsv3.backends.triton_kernels import graph_capture, ops
from dsv3.backends.triton_kernels.plugin_hooks import TritonBackend
from dsv3.backends.triton_kernels.target import NVIDIA
from dsv3.hookspecs import CONTRACT_VERSION, BackendInfo, hookimpl
from dsv3.weights import FORMATS

hooks = TritonBackend(NVIDIA)


@hookimpl
def dsv3_backend_info() -> BackendInfo:
    return BackendInfo(
        name=NVIDIA.name,
        contract_version=CONTRACT_VERSION,
        description="NVIDIA GPUs: Triton kernels (fp8 block-scaled / int8 GEMM, grouped MoE, flash prefill "
        "attention, MLA decode, paged-cache MLA, RMSNorm) with cuBLAS for bf16 and checked cuBLASLt fp8/int8 fast paths",
        device=ops.device(),
        dist_backend="nccl",
        formats=FORMATS,
        unusable_reason=hooks.unusable_reason(),
        kv_cache_fp8=(ops.fp8_compute_dtype(NVIDIA),),  # the fp8 its GPUs convert natively (as for weights)
        capture_graph=graph_capture.capture_graph(),  # CUDA graphs (HIP graphs under ROCm)
        extra={"fp8_dtype": "float8_e4m3fn", "interpreter": ops.interpreting()},
    )


# The entry point names this module, so pluggy registers it: it carries the shared hooks, bound to NVIDIA.
dsv3_op_rms_norm = hooks.dsv3_op_rms_norm
dsv3_op_attention = hooks.dsv3_op_attention
dsv3_op_mla_latent_attention = hooks.dsv3_op_mla_latent_attention
dsv3_op_paged_cache_write = hooks.dsv3_op_paged_cache_write
dsv3_op_mla_paged_attention = hooks.dsv3_op_mla_paged_attention
dsv3_op_linear = hooks.dsv3_op_linear
dsv3_op_dequantize = hooks.dsv3_op_dequantize
dsv3_op_moe_experts = hooks.dsv3_op_moe_experts
dsv3_op_silu_and_mul = hooks.dsv3_op_silu_and_mul
