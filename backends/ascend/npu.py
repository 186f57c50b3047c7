"""The seam between the plugin and torch_npu: importing it, asking whether an NPU is visible, and
which torch device type its tensors use.

Only this module imports torch_npu, and only when asked (never at plugin import). A module named
``torch_npu`` that implements the same calls stands in for it in the tests (tests/ascend_standin):
it answers the availability questions and runs the operators on CPU tensors, declaring that with
``DEVICE_TYPE = "cpu"``; real torch_npu has no such attribute and its device type is ``"npu"``.
"""

from __future__ import annotations

import importlib
from types import ModuleType

NPU_DEVICE = "npu"


def import_torch_npu() -> ModuleType:
    """``import torch_npu`` (which registers the NPU device with torch). Raises what the import raises."""
    return importlib.import_module("torch_npu")


def probe() -> tuple[ModuleType | None, str | None]:
    """``(torch_npu or None, None if an NPU is usable else one line saying why not)``."""
    try:
        tn = import_torch_npu()
    except Exception as exc:  # ImportError, or OSError from a broken CANN install: report, never raise
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return None, f"torch_npu is not installed (import torch_npu failed: {first})"
    try:
        visible = bool(tn.npu.is_available()) and int(tn.npu.device_count()) > 0
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return tn, f"torch_npu imported but no NPU is visible ({first})"
    if not visible:
        return tn, "torch_npu imported but no NPU is visible"
    return tn, None


def device_type(tn: ModuleType | None) -> str:
    """The torch device type of the tensors the operators run on: ``"npu"``, or the stand-in's own."""
    return getattr(tn, "DEVICE_TYPE", NPU_DEVICE) if tn is not None else NPU_DEVICE


def version(tn: ModuleType | None) -> str:
    return str(getattr(tn, "__version__", "unknown")) if tn is not None else "not installed"


class Unavailable:
    """Stands where torch_npu would be when it cannot be imported, so ``dsv3 backends`` can still list
    which operators the plugin supplies. The registry never runs them (the backend is unusable)."""

    def __init__(self, reason: str):
        self.reason = reason

    def __getattr__(self, name: str):
        raise RuntimeError(f"torch_npu.{name} called but {self.reason}")


def torch_npu_or_unavailable():
    """torch_npu if it imports, else an :class:`Unavailable` carrying the reason."""
    tn, reason = probe()
    return tn if tn is not None else Unavailable(reason or "torch_npu is not importable")
