"""The amd backend plugin: the shared Triton kernels (``dsv3.backends.triton_kernels``) on ROCm.

MI300-class GPUs (gfx94x) compute fp8 in ``float8_e4m3fnuz`` (max 240, no negative zero). Released
fp8 checkpoints are e4m3fn, so ``prepare_weight`` converts each fp8_block weight once at load
(bits kept, 0x80 -> 0, scales doubled) and activations are then quantized with the fnuz range,
because the kernels take the fp8 dtype from the weight. Usable under ROCm, or anywhere with
``TRITON_INTERPRET=1`` (CPU tensors through Triton's interpreter; the conversion is applied there
too, so the fnuz path is what CI checks). The operator hooks are nvidia's too (``TritonBackend``);
only the target differs (``triton_kernels.target.AMD``). Importing this module imports neither
triton nor the kernels.
"""

from __future__ import annotations

from dsv3.backends.triton_kernels import graph_capture, ops
from dsv3.backends.triton_kernels.plugin_hooks import TritonBackend
from dsv3.backends.triton_kernels.target import AMD
from dsv3.hookspecs import CONTRACT_VERSION, BackendInfo, hookimpl
from dsv3.weights import FORMATS

hooks = TritonBackend(AMD)
prepare_weight = hooks.prepare_weight


@hookimpl
def dsv3_backend_info() -> BackendInfo:
    return BackendInfo(
        name=AMD.name,
        contract_version=CONTRACT_VERSION,
        description="AMD GPUs (ROCm): Triton kernels (fp8 block-scaled in e4m3fnuz on MI300 / int8 GEMM, "
        "grouped MoE, flash prefill attention, MLA decode, paged-cache MLA, RMSNorm) with hipBLASLt for bf16",
        device=ops.device(),
        dist_backend="nccl",  # RCCL under ROCm builds of torch
        formats=FORMATS,
        unusable_reason=hooks.unusable_reason(),
        kv_cache_fp8=(ops.fp8_compute_dtype(AMD),),  # the fp8 its GPUs convert natively (as for weights)
        prepare_weight=prepare_weight,
        capture_graph=graph_capture.capture_graph(),  # CUDA graphs (HIP graphs under ROCm)
        extra={"fp8_dtype": "float8_e4m3fnuz (MI300) / float8_e4m3fn", "interpreter": ops.interpreting()},
    )


# The entry point names this module, so pluggy registers it: it carries the shared hooks, bound to AMD.
dsv3_op_rms_norm = hooks.dsv3_op_rms_norm
dsv3_op_attention = hooks.dsv3_op_attention
dsv3_op_mla_latent_attention = hooks.dsv3_op_mla_latent_attention
dsv3_op_paged_cache_write = hooks.dsv3_op_paged_cache_write
dsv3_op_mla_paged_attention = hooks.dsv3_op_mla_paged_attention
dsv3_op_linear = hooks.dsv3_op_linear
dsv3_op_dequantize = hooks.dsv3_op_dequantize
dsv3_op_moe_experts = hooks.dsv3_op_moe_experts
dsv3_op_silu_and_mul = hooks.dsv3_op_silu_and_mul
