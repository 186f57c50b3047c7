"""Installing the torch_npu TEST STAND-IN for a test, or using the real torch_npu where it exists.

In-process tests call :func:`activate` (through a fixture) which puts the stand-in into
``sys.modules["torch_npu"]`` for that test only; subprocess tests put :data:`PYTHONPATH_DIR` on
``PYTHONPATH``. Where a real torch_npu is installed, both leave it alone and the same tests run
against it (and the NPU).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

#: Directory to put on PYTHONPATH so that ``import torch_npu`` finds the stand-in.
PYTHONPATH_DIR = Path(__file__).resolve().parent
STANDIN_FILE = PYTHONPATH_DIR / "torch_npu" / "__init__.py"


def real_torch_npu_installed() -> bool:
    """Whether ``import torch_npu`` would find a torch_npu other than this stand-in."""
    mod = sys.modules.get("torch_npu")
    if mod is not None:
        return not is_standin(mod)
    spec = importlib.util.find_spec("torch_npu")
    return spec is not None and spec.origin is not None and Path(spec.origin).resolve() != STANDIN_FILE


def is_standin(mod: ModuleType) -> bool:
    return getattr(mod, "__file__", None) is not None and Path(mod.__file__).resolve() == STANDIN_FILE


def load_standin() -> ModuleType:
    """A fresh instance of the stand-in module (its own CALLS counter)."""
    spec = importlib.util.spec_from_file_location("torch_npu", STANDIN_FILE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def activate(monkeypatch) -> ModuleType:
    """Make ``import torch_npu`` return the stand-in for this test (the real one if installed)."""
    if real_torch_npu_installed():
        return importlib.import_module("torch_npu")
    mod = load_standin()
    monkeypatch.setitem(sys.modules, "torch_npu", mod)
    return mod
