"""The GPU backends dispatch once: the nvidia and amd plugins share one set of hooks, which call one
builder per operator; what differs between them is their TritonTarget (data).

Needs no GPU and no triton: building an operator imports no kernel.
"""

from __future__ import annotations

import dataclasses
import inspect
from importlib.metadata import entry_points

import pytest
import torch

from dsv3 import registry
from dsv3.backends.amd import plugin as amd_plugin
from dsv3.backends.nvidia import plugin as nvidia_plugin
from dsv3.backends.triton_kernels import ops
from dsv3.backends.triton_kernels.plugin_hooks import TritonBackend
from dsv3.backends.triton_kernels.runtime import INTERPRET_ENV
from dsv3.backends.triton_kernels.target import AMD, NVIDIA
from dsv3.hookspecs import PROJECT, OpRequest
from dsv3.weights import FP8_BLOCK, HP, INT8_W8A8, INT8_WO, Weight

PLUGINS = {"nvidia": (nvidia_plugin, NVIDIA), "amd": (amd_plugin, AMD)}
BUILDERS = [
    ops.build_rms_norm,
    ops.build_silu_and_mul,
    ops.build_attention,
    ops.build_mla_latent_attention,
    ops.build_paged_cache_write,
    ops.build_mla_paged_attention,
    ops.build_dequantize,
    ops.build_linear,
    ops.build_moe_experts,
]


def shared_hook_names() -> list[str]:
    """The methods of TritonBackend marked as pluggy hook implementations."""
    return [name for name, fn in vars(TritonBackend).items() if getattr(fn, f"{PROJECT}_impl", None) is not None]


def test_nvidia_and_amd_share_one_hook_implementation_and_differ_only_in_their_target():
    names = shared_hook_names()
    assert len(names) == 9 and all(name.startswith("dsv3_op_") for name in names)
    for module, target in PLUGINS.values():
        assert type(module.hooks) is TritonBackend and module.hooks == TritonBackend(target)
        # the module's op hooks are exactly the shared ones, bound to its own instance
        assert sorted(n for n in dir(module) if n.startswith("dsv3_op_")) == sorted(names)
        for name in names:
            hook = getattr(module, name)
            assert hook.__func__ is vars(TritonBackend)[name] and hook.__self__ is module.hooks
    assert [f.name for f in dataclasses.fields(TritonBackend)] == ["target"]
    differ = {f.name for f in dataclasses.fields(NVIDIA) if getattr(NVIDIA, f.name) != getattr(AMD, f.name)}
    assert {"name", "rocm", "fp8_dtype", "vendor_gemms"} <= differ


@pytest.mark.parametrize("name", sorted(PLUGINS))
def test_entry_point_loads_the_module_and_pluggy_registers_the_shared_hooks(name):
    (ep,) = [ep for ep in entry_points(group=registry.ENTRY_POINT_GROUP) if ep.name == name]
    module, target = PLUGINS[name]
    assert ep.load() is module
    backend = registry.make_backend(module, name, "dsv3")
    assert backend.info is not None and backend.info.name == target.name
    for hook_name in shared_hook_names():
        (impl,) = getattr(backend.manager.hook, hook_name).get_hookimpls()
        assert impl.function.__func__ is vars(TritonBackend)[hook_name]
        assert impl.function.__self__.target is target
    assert backend.manager.hook.dsv3_op_linear(request=OpRequest(HP)) is ops.linear_hp


def test_every_builder_is_listed_here():
    assert sorted(n for n in dir(ops) if n.startswith("build_")) == sorted(b.__name__ for b in BUILDERS)


@pytest.mark.parametrize("target", [NVIDIA, AMD], ids=lambda t: t.name)
@pytest.mark.parametrize("build", BUILDERS, ids=lambda b: b.__name__)
def test_each_builder_declines_a_format_outside_the_formats(build, target):
    assert build(OpRequest("nf4"), target) is None
    assert build(OpRequest("nf4", "dynamic"), target) is None
    assert build(OpRequest(HP), target) is not None  # the None above is the decline rule, not a missing builder


@pytest.mark.parametrize("target", [NVIDIA, AMD], ids=lambda t: t.name)
def test_paged_cache_builders_serve_the_kernels_and_decline_a_cache_dtype_they_do_not_handle(target):
    for build, impl in ((ops.build_paged_cache_write, ops.paged_cache_write),
                        (ops.build_mla_paged_attention, ops.mla_paged_attention)):  # fmt: skip
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            assert build(OpRequest(dtype=dtype), target) is impl
        assert build(OpRequest(dtype=torch.float8_e4m3fn), target) is None


@pytest.mark.parametrize("target", [NVIDIA, AMD], ids=lambda t: t.name)
def test_fp8_dynamic_is_declined_without_fp8_tensor_cores(target, monkeypatch):
    fp8_dynamic, int8_dynamic = OpRequest(FP8_BLOCK, "dynamic"), OpRequest(INT8_W8A8, "dynamic")
    monkeypatch.setattr(ops, "fp8_dot_supported", lambda: True)
    for build in (ops.build_linear, ops.build_moe_experts):
        assert build(fp8_dynamic, target) is not None
    monkeypatch.setattr(ops, "fp8_dot_supported", lambda: False)
    for build in (ops.build_linear, ops.build_moe_experts):
        assert build(fp8_dynamic, target) is None
        # the rest is still served: int8 products and fp8 weights dequantized in registers
        assert build(int8_dynamic, target) is not None
        assert build(OpRequest(FP8_BLOCK, "none"), target) is not None
        assert build(OpRequest(INT8_WO, "dynamic"), target) is not None


def test_vendor_gemms_follow_the_target():
    for fmt in (FP8_BLOCK, INT8_W8A8):
        nv = inspect.getclosurevars(ops.build_linear(OpRequest(fmt, "dynamic"), NVIDIA)).nonlocals
        amd = inspect.getclosurevars(ops.build_linear(OpRequest(fmt, "dynamic"), AMD)).nonlocals
        assert nv["min_m"] == ops.FAST_MIN_M and amd["min_m"] is None


def _fp8_weight() -> Weight:
    bits = torch.tensor([[0x00, 0x80, 0x38, 0xB8]], dtype=torch.uint8)  # 0, -0, 1.0, -1.0 in e4m3fn
    return Weight(bits.view(torch.float8_e4m3fn), FP8_BLOCK, torch.ones(1, 1))


def test_fp8_dtype_and_weight_preparation_follow_the_target(monkeypatch):
    monkeypatch.setenv(INTERPRET_ENV, "1")  # the interpreter takes each target's own path
    assert ops.fp8_compute_dtype(NVIDIA) == torch.float8_e4m3fn
    assert ops.fp8_compute_dtype(AMD) == torch.float8_e4m3fnuz
    assert nvidia_plugin.hooks.prepare_weight(_fp8_weight()) is None
    fnuz = amd_plugin.prepare_weight(_fp8_weight())
    assert fnuz.data.dtype == torch.float8_e4m3fnuz and fnuz.data.view(torch.uint8).tolist() == [[0, 0, 0x38, 0xB8]]
    assert torch.equal(fnuz.scale, torch.full((1, 1), 2.0))
    assert nvidia_plugin.dsv3_backend_info().prepare_weight is None
    assert amd_plugin.dsv3_backend_info().prepare_weight == amd_plugin.hooks.prepare_weight


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the unusable reasons differ here")
def test_unusable_reasons_follow_the_target(monkeypatch):
    monkeypatch.delenv(INTERPRET_ENV, raising=False)
    assert ops.fp8_compute_dtype(AMD) == torch.float8_e4m3fn  # no ROCm GPU: nothing is converted
    assert amd_plugin.prepare_weight(_fp8_weight()) is None
    not_rocm = "this torch is not a ROCm build (torch.version.hip is None) and TRITON_INTERPRET is not set"
    no_cuda = "no CUDA device visible (torch.cuda.is_available() is False) and TRITON_INTERPRET is not set"
    if torch.version.hip is None:
        assert nvidia_plugin.hooks.unusable_reason() == no_cuda
        assert amd_plugin.hooks.unusable_reason() == not_rocm
    monkeypatch.setattr(torch.version, "hip", "6.2")  # as a ROCm build of torch says
    assert nvidia_plugin.hooks.unusable_reason() == (
        "this torch is a ROCm build (torch.version.hip is set): use --backend amd"
    )
    assert amd_plugin.hooks.unusable_reason() == (
        "no ROCm GPU visible (torch.cuda.is_available() is False) and TRITON_INTERPRET is not set"
    )
