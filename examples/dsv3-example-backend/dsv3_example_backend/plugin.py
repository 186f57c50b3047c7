"""The plugin module named by the ``dsv3.backends`` entry point: hook implementations only.

Importing it has no side effects. Each ``dsv3_op_*`` hook is asked once per model build and
returns an implementation or ``None`` to decline (the op then comes from cpu_ref, reported).
"""

from __future__ import annotations

from dsv3.hookspecs import CONTRACT_VERSION, BackendInfo, OpRequest, hookimpl

from . import ops


@hookimpl
def dsv3_backend_info() -> BackendInfo:
    return BackendInfo(
        name="example",
        contract_version=CONTRACT_VERSION,
        description="example out-of-tree backend (rms_norm, silu_and_mul, hp linear in plain PyTorch)",
        device="cpu",
        dist_backend="gloo",
        formats=("hp",),
    )


@hookimpl
def dsv3_op_rms_norm(request: OpRequest):
    return ops.rms_norm


@hookimpl
def dsv3_op_silu_and_mul(request: OpRequest):
    return ops.silu_and_mul


@hookimpl
def dsv3_op_linear(request: OpRequest):
    # High-precision weights only; fp8 and int8 weights are declined and fall back to cpu_ref.
    return ops.linear_hp if request.fmt == "hp" else None
