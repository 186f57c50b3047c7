"""Where the kernels run and the argument checks their wrappers share. Imports no triton."""

from __future__ import annotations

import functools
import math
import os

import torch

from dsv3.weights import FP8_BLOCK_SIZE, FP8_DTYPES

INTERPRET_ENV = "TRITON_INTERPRET"
_TRUE = ("1", "true", "on", "yes")

#: Smallest normal exponent of each FP8 format (-6 for e4m3fn, -7 for e4m3fnuz), read from torch.
FP8_EMIN = {dt: int(math.log2(torch.finfo(dt).smallest_normal)) for dt in FP8_DTYPES}
HP_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
QBLOCK = FP8_BLOCK_SIZE  # the block of the fp8_block format (weights 128 x 128, activations 1 x 128)


def interpreting() -> bool:
    """True when Triton runs kernels through its interpreter (``TRITON_INTERPRET`` set truthy)."""
    return os.environ.get(INTERPRET_ENV, "").strip().lower() in _TRUE


#: ``DSV3_TRITON_TILES``: under the interpreter, pick tiles as this GPU would (its name -> compute units).
TILES_ENV = "DSV3_TRITON_TILES"
EMULATED_GPUS = {"sm_90": 132, "gfx942": 304}  # H100/H200 SMs, MI300X CUs
#: Triton's limit on the elements of one block tensor (the interpreter enforces it).
MAX_BLOCK_NUMEL = 1 << 20


def emulated_gpu() -> str | None:
    """The GPU whose tile choices the interpreter runs (``DSV3_TRITON_TILES``), or None: its own large tiles."""
    name = os.environ.get(TILES_ENV, "").strip()
    if not name:
        return None
    if name not in EMULATED_GPUS:
        raise ValueError(f"{TILES_ENV}={name!r}: expected one of {', '.join(EMULATED_GPUS)}")
    return name


def is_hip() -> bool:
    return torch.version.hip is not None


def tiles_for_hip() -> bool:
    """Whether tiles are chosen for an AMD GPU: this one, or the interpreter emulating ``gfx942``."""
    return emulated_gpu() == "gfx942" if interpreting() else is_hip()


class KernelArgumentError(ValueError):
    """A wrapper was called with a tensor of the wrong shape, dtype or device."""


def require(cond: bool, where: str, msg: str) -> None:
    """Raise one clear line naming the wrapper when ``cond`` is false."""
    if not cond:
        raise KernelArgumentError(f"{where}: {msg}")


def check_tensor(
    where: str,
    name: str,
    t: torch.Tensor,
    dtypes: tuple[torch.dtype, ...] | None = None,
    ndim: int | None = None,
    shape: tuple[int | None, ...] | None = None,
) -> None:
    """Check a tensor argument's type, dtype, rank and shape (``None`` in ``shape`` matches any size)."""
    require(isinstance(t, torch.Tensor), where, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        require(
            t.dtype in dtypes, where, f"{name} must have dtype in ({names}), got {str(t.dtype).replace('torch.', '')}"
        )
    if ndim is not None:
        require(t.dim() == ndim, where, f"{name} must have {ndim} dims, got shape {list(t.shape)}")
    if shape is not None:
        ok = t.dim() == len(shape) and all(s is None or s == d for s, d in zip(shape, t.shape, strict=True))
        want = ["*" if s is None else s for s in shape]
        require(ok, where, f"{name} must have shape {want}, got {list(t.shape)}")


def check_device(where: str, **tensors: torch.Tensor | None) -> torch.device:
    """All tensors on one device: a GPU, or the CPU when the interpreter is on."""
    given = {k: v for k, v in tensors.items() if v is not None}
    devices = {str(v.device) for v in given.values()}
    require(
        len(devices) == 1,
        where,
        f"tensors on different devices: {', '.join(f'{k}={v.device}' for k, v in given.items())}",
    )
    device = next(iter(given.values())).device
    if interpreting():
        require(device.type == "cpu", where, f"with {INTERPRET_ENV}=1 tensors must be on the cpu, got {device}")
    else:
        require(
            device.type == "cuda",
            where,
            f"tensors must be on a GPU (cuda device), got {device}; set {INTERPRET_ENV}=1 to run on the cpu",
        )
    return device


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels take any leading strides but need unit stride along the last dim."""
    return t if t.stride(-1) == 1 else t.contiguous()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def sm_count(index: int) -> int:
    """Streaming multiprocessors (compute units on AMD) of a GPU; under the interpreter the emulated GPU's
    (``DSV3_TRITON_TILES``), else 1."""
    if interpreting():
        gpu = emulated_gpu()
        return EMULATED_GPUS[gpu] if gpu is not None else 1
    return _device_sm_count(index)


@functools.cache
def _device_sm_count(index: int) -> int:
    if not torch.cuda.is_available():
        return 1
    return torch.cuda.get_device_properties(index).multi_processor_count


def launch_opts(num_warps: int, num_stages: int) -> dict:
    """Launch options; AMD's stream pipeliner wants at most 2 stages."""
    return {"num_warps": num_warps, "num_stages": min(num_stages, 2) if is_hip() else num_stages}
