"""The GPUs the kernels serve, as data: what differs between the nvidia and amd backends. Imports no triton."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TritonTarget:
    """One GPU vendor the kernels run on.

    name: the backend's name (``--backend``).
    rocm: needs a ROCm build of torch (``torch.version.hip`` set); False: needs a non-ROCm build.
    gpu: how the reason for being unusable names a missing GPU.
    fp8_dtype: the fp8 dtype its GPUs compute ``fp8_block`` in (e4m3fnuz on MI300); released
        checkpoints are e4m3fn, so another dtype means converting weights at load.
    fp8_dtype_archs: the GPU architectures (``gcnArchName`` prefixes) ``fp8_dtype`` is for; the
        others compute e4m3fn. Empty: every GPU of the vendor.
    vendor_gemms: may use the vendor's fp8 / int8 GEMMs (``torch._scaled_mm``, ``torch._int_mm``)
        where they are checked against the Triton kernels (``ops.fast_path_status``).
    """

    name: str
    rocm: bool
    gpu: str
    fp8_dtype: torch.dtype
    vendor_gemms: bool
    fp8_dtype_archs: tuple[str, ...] = ()


NVIDIA = TritonTarget(name="nvidia", rocm=False, gpu="CUDA device", fp8_dtype=torch.float8_e4m3fn, vendor_gemms=True)
# MI300 (gfx94x) computes e4m3fnuz; MI350 (gfx950) computes the OCP e4m3fn format directly.
AMD = TritonTarget(
    name="amd",
    rocm=True,
    gpu="ROCm GPU",
    fp8_dtype=torch.float8_e4m3fnuz,
    vendor_gemms=False,
    fp8_dtype_archs=("gfx94",),
)
