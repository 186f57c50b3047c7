"""Finding backends and resolving a backend's operators into a frozen table.

Backends are discovered through the entry-point group ``dsv3.backends``, the same path for
in-tree and out-of-tree plugins. ``DSV3_DISABLE_PLUGIN_AUTOLOAD=1`` loads only the backends
shipped with dsv3 itself (useful when a broken vendor plugin is installed).

Each discovered backend gets one PluginManager, made once (``make_backend``), holding just its
plugin; every question to that backend (its info, each operator) goes through it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import MappingProxyType

import pluggy

from . import hookspecs
from .errors import Dsv3Error
from .hookspecs import (
    COMPATIBLE_VERSIONS,
    CONTRACT_VERSION,
    NOT_YET_CALLED,
    OP_NAMES,
    WEIGHT_OPS,
    AttentionOp,
    BackendInfo,
    DequantizeOp,
    EmbeddingOp,
    LinearOp,
    MlaLatentAttentionOp,
    MlaPagedAttentionOp,
    MoeExpertsOp,
    MoeGateOp,
    OpRequest,
    PagedCacheWriteOp,
    RmsNormOp,
    RotaryOp,
    SampleOp,
    SiluAndMulOp,
)

ENTRY_POINT_GROUP = "dsv3.backends"
REFERENCE = "cpu_ref"
AUTOLOAD_ENV = "DSV3_DISABLE_PLUGIN_AUTOLOAD"


@dataclass
class Backend:
    """A discovered backend: its plugin object, its own PluginManager and what it says about itself."""

    name: str
    plugin: object
    info: BackendInfo | None
    load_error: str | None = None
    distribution: str | None = None
    manager: pluggy.PluginManager | None = field(default=None, repr=False)

    @property
    def unusable_reason(self) -> str | None:
        if self.load_error is not None:
            return self.load_error
        return self.info.unusable_reason if self.info else "plugin gives no dsv3_backend_info"


def _new_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs.BackendSpec)
    return pm


def discover() -> dict[str, Backend]:
    """Load every backend registered under the ``dsv3.backends`` entry-point group.

    A plugin that fails to import is still listed, with the import error as its reason.
    """
    only_builtin = os.environ.get(AUTOLOAD_ENV, "") not in ("", "0")
    found: dict[str, Backend] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else None
        if only_builtin and dist != "dsv3":
            continue
        if ep.name in found:
            continue
        try:
            plugin = ep.load()
        except Exception as exc:  # a broken plugin must not take the others down
            found[ep.name] = Backend(ep.name, None, None, f"plugin failed to import: {exc!r}", dist)
            continue
        found[ep.name] = make_backend(plugin, ep.name, dist)
    if REFERENCE not in found:
        # Running from a source tree without installed metadata: the reference must still exist.
        from .backends.cpu_ref import plugin as cpu_ref_plugin

        found[REFERENCE] = make_backend(cpu_ref_plugin, REFERENCE, "dsv3")
    return found


def make_backend(plugin: object, name: str | None = None, dist: str | None = None) -> Backend:
    """Wrap a plugin object (module or instance) as a Backend with a PluginManager of its own, asking
    it for its info once; a plugin written for another contract version is listed as unusable."""
    pm = _new_manager()
    pm.register(plugin)
    try:
        info = pm.hook.dsv3_backend_info()
    except Exception as exc:
        return Backend(name or repr(plugin), plugin, None, f"dsv3_backend_info raised {exc!r}", dist, pm)
    backend = Backend(name or info.name, plugin, info, None, dist, pm)
    if info is not None and info.contract_version not in COMPATIBLE_VERSIONS:
        backend.load_error = contract_mismatch(backend.name, dist, info.contract_version)
    return backend


def contract_mismatch(name: str, dist: str | None, declared: int) -> str:
    """One line: plugin ``name`` declares another contract version than this dsv3 implements."""
    who = f"plugin {name!r}" + (f" (distribution {dist})" if dist else "")
    said = f"declares contract version {declared}" if declared else "declares no contract version"
    runs = ", ".join(str(v) for v in COMPATIBLE_VERSIONS if v != CONTRACT_VERSION)
    return (
        f"{who} {said}; this dsv3 implements contract version {CONTRACT_VERSION}"
        + (f" (and runs plugins of version {runs})" if runs else "")
        + " (see dsv3.hookspecs)"
    )


def get_backend(name: str, backends: dict[str, Backend] | None = None) -> Backend:
    """The usable backend called ``name``, or a Dsv3Error saying why it cannot be used."""
    backends = discover() if backends is None else backends
    if name not in backends:
        raise Dsv3Error(f"unknown backend {name!r}; installed backends: {', '.join(sorted(backends))}")
    backend = backends[name]
    if backend.unusable_reason is not None:
        raise Dsv3Error(f"backend {name!r} is not usable on this machine: {backend.unusable_reason}")
    return backend


@dataclass(frozen=True)
class OpTable:
    """Operators resolved once for one model: plain attribute lookups on the hot path.

    Each field has the type its hook returns (``dsv3.hookspecs``). Weight operators (``linear``,
    ``dequantize``, ``moe_experts``) are mappings from weight format to implementation. ``sources``
    says which backend supplied each (op, format); ``fallbacks`` lists those the chosen backend declined.
    """

    backend: str
    act_quant: str
    embedding: EmbeddingOp
    rms_norm: RmsNormOp
    rotary: RotaryOp
    attention: AttentionOp
    mla_latent_attention: MlaLatentAttentionOp
    paged_cache_write: PagedCacheWriteOp
    mla_paged_attention: MlaPagedAttentionOp
    linear: Mapping[str, LinearOp]
    dequantize: Mapping[str, DequantizeOp]
    moe_gate: MoeGateOp
    moe_experts: Mapping[str, MoeExpertsOp]
    silu_and_mul: SiluAndMulOp
    sample: SampleOp
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def fallbacks(self) -> list[str]:
        """The (op or op[format]) keys cpu_ref fills for the chosen backend, among the ops the graph calls."""
        return [
            key for key, src in self.sources.items() if src != self.backend and key.split("[")[0] not in NOT_YET_CALLED
        ]


def _ask(backend: Backend, op: str, request: OpRequest):
    """The backend's answer to one operator hook (an implementation or None), through its own manager."""
    if backend.manager is None:
        return None
    return getattr(backend.manager.hook, f"dsv3_op_{op}")(request=request)


def resolve_ops(
    backend: Backend,
    formats: tuple[str, ...] = ("hp",),
    act_quant: str = "none",
    dtype=None,
    reference: Backend | None = None,
) -> OpTable:
    """Ask ``backend`` for every operator (weight ops once per format in ``formats``).

    What it declines is taken from the reference backend (cpu_ref), which never declines.
    """
    import torch

    dtype = torch.bfloat16 if dtype is None else dtype
    if reference is None:
        reference = backend if backend.name == REFERENCE else discover()[REFERENCE]
    resolved: dict[str, object] = {}
    sources: dict[str, str] = {}
    for op in OP_NAMES:
        fmts = formats if op in WEIGHT_OPS else ("hp",)
        per_fmt = {}
        for fmt in dict.fromkeys(fmts):
            request = OpRequest(fmt=fmt, act_quant=act_quant, dtype=dtype)
            impl, source = _ask(backend, op, request), backend.name
            if impl is None and reference is not backend:
                impl, source = _ask(reference, op, request), reference.name
            if impl is None:
                raise Dsv3Error(f"no backend implements operator {op!r} for weight format {fmt!r}")
            per_fmt[fmt] = impl
            sources[op if op not in WEIGHT_OPS else f"{op}[{fmt}]"] = source
        resolved[op] = MappingProxyType(per_fmt) if op in WEIGHT_OPS else per_fmt["hp"]
    return OpTable(backend=backend.name, act_quant=act_quant, sources=MappingProxyType(sources), **resolved)


def coverage(backend: Backend, formats: tuple[str, ...]) -> dict[str, list[str]]:
    """For ``dsv3 backends``: op name -> formats (or ``["-"]``) the backend itself implements."""
    table: dict[str, list[str]] = {}
    if backend.plugin is None:
        return table
    for op in OP_NAMES:
        fmts = formats if op in WEIGHT_OPS else ("hp",)
        for act_quant in ("none", "dynamic"):
            for fmt in fmts:
                try:
                    impl = _ask(backend, op, OpRequest(fmt=fmt, act_quant=act_quant))
                except Exception:
                    impl = None
                if impl is not None:
                    label = fmt if op in WEIGHT_OPS else "-"
                    if op == "linear" or op == "moe_experts":
                        label = f"{fmt}/{act_quant}"
                    if label not in table.setdefault(op, []):
                        table[op].append(label)
    return table
