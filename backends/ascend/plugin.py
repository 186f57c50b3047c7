"""The ascend backend plugin: Huawei Ascend NPUs through torch_npu's fused operators.

Usable when ``import torch_npu`` succeeds and it sees an NPU. Importing this module imports no
torch_npu; the info hook and the op hooks do (see ``npu.py``). What a hook declines (returns None)
runs cpu_ref's device-agnostic PyTorch on the NPU tensors, and the registry reports it.

Operators (details and the documented signatures: docs/ascend.md):

==================== ======================================== ================================
hook                 torch_npu operator                        declined
==================== ======================================== ================================
rms_norm             npu_rms_norm
rotary               npu_rotary_mul (rotary_mode="interleave")
attention            npu_fused_infer_attention_score          float32 models
mla_latent_attention npu_fused_infer_attention_score          float32 models
linear               hp: aten::linear; int8_w8a8 + dynamic:    fp8_block, int8_wo, int8 without
                     npu_dynamic_quant + npu_quant_matmul      dynamic act quant, float32 W8A8
moe_gate             npu_moe_gating_top_k
moe_experts          npu_grouped_matmul (+ npu_dynamic_quant,  as linear
                     npu_swiglu)
silu_and_mul         npu_swiglu
embedding, dequantize, sample                                  always (plain PyTorch serves them)
paged_cache_write,                                             always: cpu_ref's gather + PyTorch
mla_paged_attention                                            (FIA's paged MLA mode: not mapped)
==================== ======================================== ================================
"""

from __future__ import annotations

import torch

from dsv3.hookspecs import CONTRACT_VERSION, BackendInfo, OpRequest, hookimpl
from dsv3.weights import HP, INT8_W8A8

from . import attention, convert, gemm, moe, norm_rope, npu

#: Compute dtypes of the fused attention and of the W8A8 products' outputs.
HALF_DTYPES = (torch.float16, torch.bfloat16)


@hookimpl
def dsv3_backend_info() -> BackendInfo:
    tn, reason = npu.probe()
    return BackendInfo(
        name="ascend",
        contract_version=CONTRACT_VERSION,
        description=f"Huawei Ascend NPU: torch_npu fused operators (torch_npu {npu.version(tn)})",
        device=npu.device_type(tn),
        dist_backend="hccl",
        formats=(HP, INT8_W8A8),
        unusable_reason=reason,
        convert_formats=dict(convert.CONVERT_FORMATS),
        convert_weight=convert.convert_weight,
    )


def _w8a8(request: OpRequest) -> bool:
    return request.fmt == INT8_W8A8 and request.act_quant == "dynamic" and request.dtype in HALF_DTYPES


@hookimpl
def dsv3_op_rms_norm(request: OpRequest):
    return norm_rope.rms_norm_with(npu.torch_npu_or_unavailable())


@hookimpl
def dsv3_op_rotary(request: OpRequest):
    return norm_rope.rotary_with(npu.torch_npu_or_unavailable())


@hookimpl
def dsv3_op_silu_and_mul(request: OpRequest):
    return norm_rope.silu_and_mul_with(npu.torch_npu_or_unavailable())


@hookimpl
def dsv3_op_attention(request: OpRequest):
    if request.dtype not in HALF_DTYPES:
        return None
    return attention.attention_with(npu.torch_npu_or_unavailable())


@hookimpl
def dsv3_op_mla_latent_attention(request: OpRequest):
    if request.dtype not in HALF_DTYPES:
        return None
    return attention.mla_latent_attention_with(npu.torch_npu_or_unavailable())


@hookimpl
def dsv3_op_linear(request: OpRequest):
    if request.fmt == HP:
        return gemm.linear_hp
    if _w8a8(request):
        return gemm.linear_w8a8_with(npu.torch_npu_or_unavailable())
    return None  # fp8_block (no FP8 on 910B: converted at load), int8_wo, int8 without act quant


@hookimpl
def dsv3_op_moe_gate(request: OpRequest):
    return moe.moe_gate_with(npu.torch_npu_or_unavailable())


@hookimpl
def dsv3_op_moe_experts(request: OpRequest):
    if request.fmt == HP:
        return moe.moe_experts_with(npu.torch_npu_or_unavailable(), quantized=False)
    if _w8a8(request):
        return moe.moe_experts_with(npu.torch_npu_or_unavailable(), quantized=True)
    return None
