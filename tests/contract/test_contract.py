"""Meta-tests over the operator contract (core/hookspecs.py) and the backend registry.

Every hookspec documents shapes; cpu_ref implements every operator for every format and never
declines; a backend that declines an operator gets cpu_ref's, and the fallback is reported; pluggy
is consulted when a model is built, never while it runs; ``dsv3 backends`` lists every in-tree
backend with the reason it is not usable here; DSV3_DISABLE_PLUGIN_AUTOLOAD=1 blocks outside plugins.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import re
import typing
from collections.abc import Mapping

import pluggy
import pytest
import torch

import dsv3
from dsv3 import hookspecs, registry
from dsv3.backends.cpu_ref import basic
from dsv3.backends.cpu_ref import plugin as cpu_ref_plugin
from dsv3.cli import main as dsv3_main
from dsv3.errors import Dsv3Error
from dsv3.hookspecs import CONTRACT_VERSION, OP_NAMES, WEIGHT_OPS, BackendInfo, OpRequest, hookimpl
from dsv3.weights import ACT_QUANT_MODES, FORMATS

IN_TREE = ("cpu_ref", "cpu", "nvidia", "amd", "ascend")
SPEC_NAMES = sorted(n for n in vars(hookspecs.BackendSpec) if n.startswith("dsv3_"))
OP_SPECS = [n for n in SPEC_NAMES if n.startswith("dsv3_op_")]
DTYPE_WORDS = ("fp32", "float32", "int64", "bf16", "compute dtype", "dtype", "Weight")


def test_op_names_are_exactly_the_op_hooks():
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs.BackendSpec)
    hooks = {n for n in dir(pm.hook) if n.startswith("dsv3_op_")}
    assert {f"dsv3_op_{n}" for n in OP_NAMES} == hooks == set(OP_SPECS)
    assert set(WEIGHT_OPS) <= set(OP_NAMES)
    assert "dsv3_backend_info" in SPEC_NAMES


def test_every_op_has_its_protocol_in_the_hook_and_the_op_table():
    assert list(hookspecs.OP_PROTOCOLS) == list(OP_NAMES)
    table = typing.get_type_hints(registry.OpTable)
    for op, protocol in hookspecs.OP_PROTOCOLS.items():
        returns = typing.get_type_hints(getattr(hookspecs.BackendSpec, f"dsv3_op_{op}"))["return"]
        assert returns == protocol | None, op
        assert table[op] == (Mapping[str, protocol] if op in WEIGHT_OPS else protocol), op


def test_contract_version_4_is_the_one_with_the_fp8_latent_cache():
    assert CONTRACT_VERSION == 4
    assert {"paged_cache_write", "mla_paged_attention"} <= set(OP_NAMES)
    assert "Version 3 added the\npaged latent cache" in hookspecs.__doc__
    assert "version 4 their FP8\ncache layout" in hookspecs.__doc__
    # a plugin of version 2 or 3 still runs (the compute-dtype cache); it declares no fp8 cache
    assert set(hookspecs.COMPATIBLE_VERSIONS) == {2, 3, 4}
    assert hookspecs.BackendInfo(name="old", description="v3", contract_version=3).kv_cache_fp8 == ()


@pytest.mark.parametrize("name", OP_SPECS)
def test_every_op_hookspec_documents_shapes_and_dtypes(name):
    doc = inspect.getdoc(getattr(hookspecs.BackendSpec, name)) or ""
    assert "(" in doc and ("->" in doc or any(w in doc for w in DTYPE_WORDS)), f"{name}: no shapes in {doc!r}"
    shape = r"\((?:\.\.\.|\w+)(?:, ?[\w./+* ]+)+\)"  # (B, T, D), (..., out, in), (B, S, C + R)
    assert re.search(shape, doc), f"{name}: no shape like (B, T, D) in its docstring"
    params = list(inspect.signature(getattr(hookspecs.BackendSpec, name)).parameters)
    assert params == ["self", "request"], f"{name} must take only the OpRequest"


@pytest.mark.parametrize("name", OP_SPECS)
def test_cpu_ref_implements_every_hook(name):
    impl = getattr(cpu_ref_plugin, name, None)
    assert impl is not None, f"cpu_ref has no {name}"
    assert hasattr(impl, hookspecs.PROJECT + "_impl"), f"cpu_ref.{name} is not marked @hookimpl"


def test_cpu_ref_never_declines():
    backend = registry.make_backend(cpu_ref_plugin, "cpu_ref", "dsv3")
    assert backend.unusable_reason is None and set(backend.info.formats) == set(FORMATS)
    for act_quant in ACT_QUANT_MODES:
        for dtype in (torch.float32, torch.bfloat16):
            table = registry.resolve_ops(backend, FORMATS, act_quant, dtype, backend)
            assert table.fallbacks == [] and set(table.sources.values()) == {"cpu_ref"}
            for op in OP_NAMES:
                impl = getattr(table, op)
                impls = dict(impl) if op in WEIGHT_OPS else {"hp": impl}
                assert set(impls) == (set(FORMATS) if op in WEIGHT_OPS else {"hp"})
                assert all(callable(f) for f in impls.values()), op


class FakeVendor:
    """A backend plugin defined here: it brings its own rms_norm and declines linear (any format)."""

    def __init__(self):
        self.rms_calls = 0

    @hookimpl
    def dsv3_backend_info(self) -> BackendInfo:
        return BackendInfo(
            name="fakevendor",
            description="test double",
            contract_version=CONTRACT_VERSION,
            device="cpu",
            formats=("hp",),
        )

    @hookimpl
    def dsv3_op_rms_norm(self, request: OpRequest):
        def rms_norm(x, weight, eps):
            """x (..., D), weight (D,) -> (..., D): cpu_ref's, counted."""
            self.rms_calls += 1
            return basic.rms_norm(x, weight, eps)

        return rms_norm

    @hookimpl
    def dsv3_op_linear(self, request: OpRequest):
        return None  # declines every format


def test_a_declined_op_falls_back_to_cpu_ref_and_is_reported():
    fake = FakeVendor()
    backend = registry.make_backend(fake)
    assert backend.name == "fakevendor" and backend.unusable_reason is None
    table = registry.resolve_ops(backend, ("hp",), "none", torch.float32)
    assert table.backend == "fakevendor"
    assert table.sources["rms_norm"] == "fakevendor"
    assert table.sources["linear[hp]"] == "cpu_ref" and "linear[hp]" in table.fallbacks
    assert "rms_norm" not in table.fallbacks
    # everything it does not implement is reported, and only that (the graph calls every op now)
    assert hookspecs.NOT_YET_CALLED == frozenset()
    assert set(table.fallbacks) == {k for k in table.sources if k != "rms_norm"}
    x = torch.randn(2, 8)
    assert torch.equal(table.rms_norm(x, torch.ones(8), 1e-6), basic.rms_norm(x, torch.ones(8), 1e-6))
    assert fake.rms_calls == 1


def test_loading_with_a_plugin_uses_its_ops_reports_fallbacks_and_never_calls_pluggy(tiny_ckpt, monkeypatch):
    fake = FakeVendor()
    real_discover = registry.discover
    monkeypatch.setattr(registry, "discover", lambda: {**real_discover(), "fakevendor": registry.make_backend(fake)})
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        engine = dsv3.load(tiny_ckpt, backend="fakevendor", dtype="float32", progress=False)
    assert "fakevendor falls back to cpu_ref for:" in err.getvalue() and "linear[hp]" in err.getvalue()
    reference = dsv3.load(tiny_ckpt, backend="cpu_ref", dtype="float32", progress=False)

    real_call = pluggy.HookCaller.__call__
    dsv3_calls = []

    def guarded(self, *args, **kwargs):  # pytest runs on pluggy too: only dsv3's hooks are counted
        if self.name.startswith("dsv3_"):
            dsv3_calls.append(self.name)
        return real_call(self, *args, **kwargs)

    tokens = torch.randint(2, 96, (1, 12), generator=torch.Generator().manual_seed(0))
    with monkeypatch.context() as m:
        m.setattr(pluggy.HookCaller, "__call__", guarded)
        registry.make_backend(FakeVendor())  # the guard sees hook calls...
        assert dsv3_calls == ["dsv3_backend_info"]
        dsv3_calls.clear()
        got = engine.logits(tokens)  # ...and running the model makes none
        out = engine.generate([tokens[0].tolist()], max_new_tokens=3, temperature=0.0)[0]
    assert dsv3_calls == [], f"pluggy called while the model ran: {sorted(set(dsv3_calls))}"
    assert fake.rms_calls > 0  # its operator really ran
    assert torch.equal(got, reference.logits(tokens))
    assert 1 <= len(out.token_ids) <= 3


def _backends_output(*args: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert dsv3_main(["backends", *args]) == 0
    return out.getvalue()


def test_dsv3_backends_lists_every_in_tree_backend_and_why_not_usable():
    text = _backends_output()
    found = registry.discover()
    assert set(IN_TREE) <= set(found)
    for name in IN_TREE:
        b = found[name]
        line = next((ln for ln in text.splitlines() if ln.startswith(f"{name}:")), None)
        assert line is not None, f"{name} missing from `dsv3 backends`:\n{text}"
        if b.unusable_reason is None:
            assert line == f"{name}: usable"
        else:
            assert line == f"{name}: NOT usable: {b.unusable_reason}" and b.unusable_reason.strip()
    assert found["cpu_ref"].unusable_reason is None
    cpu_ref_block = text.split("cpu_ref: usable", 1)[1].split("\n\n")[0]
    for op in OP_NAMES:  # the reference lists every operator in its coverage table
        assert re.search(rf"^\s+{op}\s", cpu_ref_block, re.M), f"{op} not in cpu_ref's coverage"
    brief = _backends_output("--brief")
    assert len(brief.strip().splitlines()) == len(found)


@pytest.fixture
def outside_plugins(tmp_path, monkeypatch):
    """Two plugins of another distribution on sys.path: a working one and one that fails to import."""
    (tmp_path / "vendor_ok.py").write_text(
        "from dsv3.hookspecs import BackendInfo, hookimpl\n\n\n"
        "@hookimpl\ndef dsv3_backend_info():\n    return BackendInfo(name='vendor_ok', description='outside plugin', "
        f"contract_version={CONTRACT_VERSION})\n"
    )
    (tmp_path / "vendor_broken.py").write_text("raise ImportError('vendor SDK missing')\n")
    dist = tmp_path / "dsv3_vendor_test-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: dsv3-vendor-test\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[dsv3.backends]\nvendor_ok = vendor_ok\nvendor_broken = vendor_broken\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv(registry.AUTOLOAD_ENV, raising=False)
    return monkeypatch


def test_outside_plugins_load_and_a_broken_one_is_listed_not_fatal(outside_plugins):
    found = registry.discover()
    assert set(IN_TREE) <= set(found)
    assert found["vendor_ok"].unusable_reason is None and found["vendor_ok"].distribution == "dsv3-vendor-test"
    assert "vendor SDK missing" in found["vendor_broken"].unusable_reason
    text = _backends_output("--brief")
    assert "vendor_ok [dsv3-vendor-test]: usable" in text
    assert re.search(r"^vendor_broken \[dsv3-vendor-test\]: NOT usable: .*vendor SDK missing", text, re.M)


def test_disable_plugin_autoload_keeps_only_dsv3s_own(outside_plugins):
    outside_plugins.setenv(registry.AUTOLOAD_ENV, "1")
    found = registry.discover()
    assert set(IN_TREE) <= set(found) and not {"vendor_ok", "vendor_broken"} & set(found)
    assert all(b.distribution == "dsv3" for b in found.values())  # only dsv3's own
    assert "vendor_ok" not in _backends_output("--brief")


def test_a_version_2_plugin_still_runs_and_cpu_ref_fills_the_paged_cache_ops():
    """Version 3 only added the paged-cache hooks: cpu_ref fills them, reported like any op the graph calls."""

    class V2Vendor(FakeVendor):
        @hookimpl
        def dsv3_backend_info(self) -> BackendInfo:
            return BackendInfo(name="v2vendor", description="written for contract 2", contract_version=2)

    backend = registry.make_backend(V2Vendor(), dist="dsv3-v2vendor")
    assert backend.unusable_reason is None
    table = registry.resolve_ops(backend, ("hp",), "none", torch.float32, registry.discover()["cpu_ref"])
    assert table.sources["mla_paged_attention"] == "cpu_ref"
    assert {"mla_paged_attention", "paged_cache_write", "embedding"} <= set(table.fallbacks)


@pytest.mark.parametrize("declared", [0, 1, CONTRACT_VERSION + 1])
def test_a_plugin_of_another_contract_version_is_refused_in_one_line(declared, monkeypatch):
    class OldVendor(FakeVendor):
        @hookimpl
        def dsv3_backend_info(self) -> BackendInfo:
            return BackendInfo(name="oldvendor", description="written for another contract", contract_version=declared)

    backend = registry.make_backend(OldVendor(), dist="dsv3-oldvendor")
    reason = backend.unusable_reason
    assert reason is not None and "\n" not in reason
    assert "'oldvendor'" in reason and "dsv3-oldvendor" in reason and f"contract version {CONTRACT_VERSION}" in reason
    assert (f"declares contract version {declared}" if declared else "declares no contract version") in reason
    real_discover = registry.discover
    monkeypatch.setattr(registry, "discover", lambda: {**real_discover(), "oldvendor": backend})
    with pytest.raises(Dsv3Error, match="not usable on this machine: plugin 'oldvendor'"):
        dsv3.load(backend="oldvendor", progress=False)


def test_each_backend_has_one_plugin_manager_made_at_discovery(monkeypatch):
    made = []
    real_new = registry._new_manager
    monkeypatch.setattr(registry, "_new_manager", lambda: made.append(1) or real_new())
    backends = registry.discover()
    assert len(made) == sum(b.manager is not None for b in backends.values())
    registry.resolve_ops(backends["cpu_ref"], FORMATS, "dynamic", torch.float32)
    registry.coverage(backends["cpu_ref"], FORMATS)
    assert len(made) == sum(b.manager is not None for b in backends.values())  # questions make no new ones


def test_load_discovers_once_and_makes_one_plugin_manager_per_backend(monkeypatch):
    """Before, one dsv3.load made ~26 managers and discovered the backends three times."""
    made, discovered = [], []
    real_new, real_discover = registry._new_manager, registry.discover
    monkeypatch.setattr(registry, "_new_manager", lambda: made.append(1) or real_new())
    monkeypatch.setattr(registry, "discover", lambda: discovered.append(1) or real_discover())
    engine = dsv3.load(dtype="float32", progress=False)
    managers_made = len(made)
    monkeypatch.undo()
    backends = registry.discover()
    assert engine.model.ops.backend == "cpu_ref" and discovered == [1]
    assert managers_made == sum(b.manager is not None for b in backends.values())
