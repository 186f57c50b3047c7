"""The cpu_ref backend plugin: implements every operator for every format; never declines."""

from __future__ import annotations

from dsv3.hookspecs import CONTRACT_VERSION, BackendInfo, OpRequest, hookimpl
from dsv3.weights import FORMATS, FP8_DTYPES

from . import attention as _attention
from . import basic, moe, paged, quant


@hookimpl
def dsv3_backend_info() -> BackendInfo:
    return BackendInfo(
        name="cpu_ref",
        contract_version=CONTRACT_VERSION,
        description="pure PyTorch reference (runs on any device's tensors; the fallback everywhere)",
        device="cpu",
        dist_backend="gloo",
        formats=FORMATS,
        kv_cache_fp8=FP8_DTYPES,  # e4m3fn first (FlashMLA's); e4m3fnuz too, for a backend that stores that
    )


@hookimpl
def dsv3_op_embedding(request: OpRequest):
    return basic.embedding


@hookimpl
def dsv3_op_rms_norm(request: OpRequest):
    return basic.rms_norm


@hookimpl
def dsv3_op_rotary(request: OpRequest):
    return basic.rotary


@hookimpl
def dsv3_op_attention(request: OpRequest):
    return _attention.attention


@hookimpl
def dsv3_op_mla_latent_attention(request: OpRequest):
    return _attention.mla_latent_attention


@hookimpl
def dsv3_op_paged_cache_write(request: OpRequest):
    return paged.paged_cache_write


@hookimpl
def dsv3_op_mla_paged_attention(request: OpRequest):
    return paged.mla_paged_attention


@hookimpl
def dsv3_op_linear(request: OpRequest):
    return quant.linear_for(request.fmt, request.act_quant)


@hookimpl
def dsv3_op_dequantize(request: OpRequest):
    return quant.dequantize


@hookimpl
def dsv3_op_moe_gate(request: OpRequest):
    return moe.moe_gate


@hookimpl
def dsv3_op_moe_experts(request: OpRequest):
    fmt, act_quant = request.fmt, request.act_quant
    return moe.moe_experts_with(quant.linear_for(fmt, act_quant), quant.batched_linear_for(fmt, act_quant))


@hookimpl
def dsv3_op_silu_and_mul(request: OpRequest):
    return basic.silu_and_mul


@hookimpl
def dsv3_op_sample(request: OpRequest):
    return basic.sample
