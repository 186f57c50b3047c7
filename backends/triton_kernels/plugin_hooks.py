"""The operator hooks of the GPU backends, written once: ``TritonBackend(target)``. Imports no triton.

Each hook hands the request to its operator's builder in ``ops``, which states what it declines.
Operators without a hook here are declined for every request and come from cpu_ref: embedding,
rotary, moe_gate, sample.
The nvidia and amd plugins are one instance each, with their :class:`~.target.TritonTarget`. The
entry points name the plugin modules, which pluggy registers, so each plugin module exports its
instance's hooks as module attributes (bound methods keep the hookimpl markers).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    hookimpl,
)
from dsv3.weights import Weight

from . import ops
from .target import TritonTarget


@dataclass(frozen=True)
class TritonBackend:
    """The operator hooks of a backend built on these kernels; its target is all that differs."""

    target: TritonTarget

    @hookimpl
    def dsv3_op_rms_norm(self, request: OpRequest) -> RmsNormOp | None:
        return ops.build_rms_norm(request, self.target)

    @hookimpl
    def dsv3_op_attention(self, request: OpRequest) -> AttentionOp | None:
        return ops.build_attention(request, self.target)

    @hookimpl
    def dsv3_op_mla_latent_attention(self, request: OpRequest) -> MlaLatentAttentionOp | None:
        return ops.build_mla_latent_attention(request, self.target)

    @hookimpl
    def dsv3_op_paged_cache_write(self, request: OpRequest) -> PagedCacheWriteOp | None:
        return ops.build_paged_cache_write(request, self.target)

    @hookimpl
    def dsv3_op_mla_paged_attention(self, request: OpRequest) -> MlaPagedAttentionOp | None:
        return ops.build_mla_paged_attention(request, self.target)

    @hookimpl
    def dsv3_op_linear(self, request: OpRequest) -> LinearOp | None:
        return ops.build_linear(request, self.target)

    @hookimpl
    def dsv3_op_dequantize(self, request: OpRequest) -> DequantizeOp | None:
        return ops.build_dequantize(request, self.target)

    @hookimpl
    def dsv3_op_moe_experts(self, request: OpRequest) -> MoeExpertsOp | None:
        return ops.build_moe_experts(request, self.target)

    @hookimpl
    def dsv3_op_silu_and_mul(self, request: OpRequest) -> SiluAndMulOp | None:
        return ops.build_silu_and_mul(request, self.target)

    def unusable_reason(self) -> str | None:
        """``BackendInfo.unusable_reason``: None when this target's backend runs here, else why not."""
        return ops.unusable_reason(self.target)

    def prepare_weight(self, w: Weight) -> Weight | None:
        """``BackendInfo.prepare_weight``: an e4m3fn weight converted to the dtype the target computes here."""
        return ops.prepare_weight(w, self.target)
