"""The cpu backend plugin: faster CPU kernels (x86-64, aarch64) for the operators where they pay; every
other operator is declined and cpu_ref supplies it (reported, as for any backend).

Implemented: ``mla_paged_attention`` (``paged.py``: the pages read in place by a C kernel, no per-layer
gather), for float32 and bfloat16 models and the FP8 latent cache. Declined: everything else, including
``paged_cache_write`` (cpu_ref's writes only the N new entries: nothing to gather). The C kernels are
compiled with the machine's compiler at the first model build (``native.py``); with no compiler the
backend is unusable and says why. Importing this module compiles nothing.
"""

from __future__ import annotations

import platform

from dsv3.hookspecs import CONTRACT_VERSION, BackendInfo, OpRequest, hookimpl
from dsv3.weights import FP8_DTYPES

from . import native, paged

#: Machines the kernels are written and tuned for (anything else: unusable, say why).
MACHINES = ("x86_64", "AMD64", "aarch64", "arm64")


def unusable_reason() -> str | None:
    """None when this machine can run the backend, else one line saying why not (cheap: builds nothing)."""
    if platform.machine() not in MACHINES:
        return f"machine {platform.machine()!r} is not x86-64 or aarch64"
    if native.compiler() is None:
        return "no C compiler to build its kernels (cc not on PATH; set CC)"
    return native.unavailable_reason()  # set after a failed build


@hookimpl
def dsv3_backend_info() -> BackendInfo:
    return BackendInfo(
        name="cpu",
        contract_version=CONTRACT_VERSION,
        description="x86-64 / aarch64 CPUs: C kernels built for this machine (paged MLA attention read in "
        "place); the rest from cpu_ref",
        device="cpu",
        dist_backend="gloo",
        formats=("hp",),
        unusable_reason=unusable_reason(),
        kv_cache_fp8=FP8_DTYPES,  # its paged attention decodes both; cpu_ref's write encodes both
    )


@hookimpl
def dsv3_op_mla_paged_attention(request: OpRequest):
    if not paged.supports(request.dtype) or native.library() is None:
        return None  # float16 models, or no kernels on this machine: cpu_ref's
    return paged.mla_paged_attention
