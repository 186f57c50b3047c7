"""The onnxruntime backend plugin: a whole-model backend, not a per-operator one.

ONNX Runtime runs a whole graph per call, so this plugin implements none of the ``dsv3_op_*``
hooks. Instead its BackendInfo carries ``whole_model``: a factory that ``dsv3.load``
calls in place of building the model from an operator table (see ``runner.load_whole_model``).
Importing this module does not import onnxruntime.
"""

from __future__ import annotations

import importlib.util

from dsv3.hookspecs import CONTRACT_VERSION, BackendInfo, hookimpl
from dsv3.weights import HP


def unusable_reason() -> str | None:
    """None when onnxruntime and onnx are importable, else one line saying what to install."""
    missing = [name for name in ("onnxruntime", "onnx") if importlib.util.find_spec(name) is None]
    if missing:
        return f"{' and '.join(missing)} not installed (pip install 'dsv3[onnx]')"
    return None


def _whole_model(*args, **kwargs):
    from .runner import load_whole_model

    return load_whole_model(*args, **kwargs)


@hookimpl
def dsv3_backend_info() -> BackendInfo:
    return BackendInfo(
        name="onnxruntime",
        contract_version=CONTRACT_VERSION,
        description="ONNX Runtime (CPU execution provider) running the whole exported graph "
        "(`dsv3 export onnx`; exported on first use into a cache directory)",
        device="cpu",
        dist_backend="gloo",
        formats=(HP,),
        unusable_reason=unusable_reason(),
        whole_model=_whole_model,
    )
