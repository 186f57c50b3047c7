"""Run the conformance cases of one backend against cpu_ref and collect a report.

Only what the backend implements itself is tested: each operator (and, for weight operators,
each format and activation mode) is asked of the backend's own plugin, without the cpu_ref
fallback behind it; what it declines is listed as falling back to cpu_ref.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from .. import registry
from ..errors import Dsv3Error
from ..hookspecs import OP_NAMES, WEIGHT_OPS, OpRequest
from ..weights import ACT_QUANT_MODES, FORMATS, HP, INT8_WO, Weight
from .cases import Case, CaseData, Spec, cases_for, uncovered_ops
from .compare import Outcome, check_meta, check_sample, compare_routing, compare_tensors, fail
from .inputs import argument_names, first_change, snapshot
from .tolerances import Tolerance, tolerance_for

#: Compute dtypes the kit exercises by default (the model's activation dtypes).
DEFAULT_DTYPES = (torch.float32, torch.bfloat16)
#: Input tensors (plain, or inside a Weight or other dataclass, tuple or list) up to this many elements are
#: checked for being modified in place (they are copied first).
_INPLACE_CHECK_LIMIT = 1 << 22
#: Operators whose inputs do not depend on the compute dtype (logits are float32).
_DTYPE_FREE = ("sample",)
#: Weight formats for which act_quant changes nothing (the contract quantizes no activation).
_MODE_FREE = (HP, INT8_WO)


#: Operators that read or write the paged latent cache: also run on the FP8 cache a backend declares.
FP8_CACHE_OPS = ("paged_cache_write", "mla_paged_attention")


def kv_cache_fp8(backend: registry.Backend) -> tuple[torch.dtype, ...]:
    """The fp8 dtypes of the FP8 latent cache ``backend`` declares (``BackendInfo.kv_cache_fp8``), () if none."""
    try:
        return tuple(getattr(backend.info, "kv_cache_fp8", ()) or ())
    except Exception:  # a backend whose info cannot be read has its own error row
        return ()


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Unit:
    """One table row: the backend's implementation of ``spec`` and cpu_ref's."""

    spec: Spec
    impl: Callable
    reference: Callable

    @property
    def label(self) -> str:
        """``fmt/act_quant`` for weight operators, ``-`` for the others (``kv:e4m3fn``: an FP8 latent cache)."""
        if self.spec.kv_cache is not None:
            return "kv:" + dtype_name(self.spec.kv_cache).removeprefix("float8_")
        if self.spec.op in WEIGHT_OPS:
            return f"{self.spec.fmt}/{self.spec.act_quant}"
        return "-" if self.spec.act_quant == "none" else "-/dynamic"

    @property
    def id(self) -> str:
        return f"{self.spec.op}[{self.label}]-{dtype_name(self.spec.dtype)}"


@dataclass
class Plan:
    """What will be tested (units), what falls back to cpu_ref, and operators whose resolution raised."""

    units: list[Unit]
    declined: dict[str, list[str]]  # op -> "label@dtype" the backend declines
    errors: list[tuple[str, str]]  # (op label, message)
    offered: dict[str, set] = field(default_factory=dict)  # op -> {(label, dtype)} the backend implements

    def fallbacks(self) -> list[str]:
        """Compact names of what falls back: ``rotary``, ``linear[fp8_block/none]``, ``rms_norm (bfloat16)``."""
        out = []
        for op, labels in self.declined.items():
            offered = self.offered.get(op, set())
            if not offered:
                out.append(op)
                continue
            by_label: dict[str, list[str]] = {}
            for item in labels:
                label, dt = item.rsplit("@", 1)
                by_label.setdefault(label, []).append(dt)
            parts = []
            for label, dts in by_label.items():
                name = op if label in ("-", "-/dynamic") else f"{op}[{label}]"
                whole = not any(lbl == label for lbl, _ in offered)
                parts.append(name if whole else f"{name} ({', '.join(dts)})")
            out.extend(parts)
        return out


def load_backend(backend: str | registry.Backend | object) -> registry.Backend:
    """A usable Backend from a name, a Backend, or a plugin object (module or instance with hookimpls)."""
    if isinstance(backend, str):
        return registry.get_backend(backend)
    if not isinstance(backend, registry.Backend):
        backend = registry.make_backend(backend)
    if backend.unusable_reason is not None:
        raise Dsv3Error(f"backend {backend.name!r} is not usable on this machine: {backend.unusable_reason}")
    return backend


def _reference_backend(backend: registry.Backend) -> registry.Backend:
    if backend.name == registry.REFERENCE and backend.distribution in (None, "dsv3"):
        return backend
    from ..backends.cpu_ref import plugin

    return registry.make_backend(plugin, registry.REFERENCE, "dsv3")


def plan(
    backend: registry.Backend,
    dtypes: tuple[torch.dtype, ...] = DEFAULT_DTYPES,
    ops: tuple[str, ...] | None = None,
) -> Plan:
    """Ask the backend's own plugin for every operator x format x activation mode x dtype."""
    reference = _reference_backend(backend)
    units: list[Unit] = []
    declined: dict[str, list[str]] = {}
    offered: dict[str, set] = {}
    errors: list[tuple[str, str]] = []
    seen: dict[tuple, list[tuple]] = {}
    for op in ops or OP_NAMES:
        if op in uncovered_ops((op,)):
            errors.append(
                (op, "the conformance kit has no cases for this operator (add a generator to CASE_GENERATORS)")
            )
            continue
        fmts = FORMATS if op in WEIGHT_OPS else (HP,)
        for dtype in dtypes:
            for fmt in fmts:
                first: tuple | None = None
                for act_quant in ACT_QUANT_MODES:
                    spec = Spec(op, fmt, act_quant, dtype)
                    request = OpRequest(fmt=fmt, act_quant=act_quant, dtype=dtype)
                    unit_label = Unit(spec, None, None).label
                    try:
                        impl = registry._ask(backend, op, request)
                    except Exception as exc:
                        errors.append((f"{op}[{unit_label}]@{dtype_name(dtype)}", f"resolving raised {exc!r}"))
                        continue
                    if impl is None:
                        if op in WEIGHT_OPS or act_quant == "none":
                            declined.setdefault(op, []).append(f"{unit_label}@{dtype_name(dtype)}")
                        continue
                    ref = registry._ask(reference, op, request)
                    if first is not None and (first == (impl, ref) or (fmt in _MODE_FREE and first[0] is impl)):
                        continue  # the same implementation answers both modes: test it once
                    if op not in WEIGHT_OPS:  # act_quant means nothing to it (and dtype nothing to sample)
                        key = (op,) if op in _DTYPE_FREE else (op, dtype)
                        if (impl, ref) in seen.setdefault(key, []):
                            continue
                        seen[key].append((impl, ref))
                    first = first or (impl, ref)
                    units.append(Unit(spec, impl, ref))
                    offered.setdefault(op, set()).add((unit_label, dtype_name(dtype)))
                    if op in FP8_CACHE_OPS and act_quant == "none":  # the FP8 latent cache, where declared
                        for kv in kv_cache_fp8(backend):
                            units.append(Unit(dataclasses.replace(spec, kv_cache=kv), impl, ref))
    return Plan(units, declined, errors, offered)


# ---------------------------------------------------------------------------------------- running one case
def _move(value, device: str, prepare: Callable | None):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, Weight):
        moved = value.to(device)
        if prepare is not None and value.fmt != HP:
            prepared = prepare(moved)
            moved = moved if prepared is None else prepared
        return moved
    return value


def _readable_by_reference(original: Weight, prepared: Weight) -> bool:
    """Whether cpu_ref can interpret a prepared weight (same format, shapes and a dtype it knows)."""
    from ..weights import FP8_DTYPES

    if prepared.fmt != original.fmt or prepared.data.shape != original.data.shape:
        return False
    if (prepared.scale is None) != (original.scale is None):
        return False
    if prepared.scale is not None and prepared.scale.shape != original.scale.shape:
        return False
    return prepared.data.dtype == original.data.dtype or (
        original.data.dtype in FP8_DTYPES and prepared.data.dtype in FP8_DTYPES
    )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def run_case(unit: Unit, case: Case, device: str, prepare: Callable | None = None) -> Outcome:
    """Build the case, run cpu_ref on the CPU and the backend on its device, and judge the result."""
    data: CaseData = case.build()
    dev_args = tuple(_move(a, device, prepare) for a in data.args)
    # the reference reads the weights the backend was handed when it can (e.g. e4m3fnuz after prepare)
    ref_args = tuple(
        d.to("cpu") if isinstance(a, Weight) and a.fmt != HP and _readable_by_reference(a, d) else a
        for a, d in zip(data.args, dev_args, strict=True)
    )
    device_type = torch.device(device).type
    tol = tolerance_for(unit.spec.op, unit.spec.fmt, unit.spec.act_quant, unit.spec.dtype)
    if data.check == "sample":
        logits, temperature, top_p, seed = data.args
        dev = dev_args[:3]

        def run(s):
            gen = None if s is None else torch.Generator(device=device).manual_seed(s)
            return unit.impl(*dev, gen)

        names = argument_names(unit.reference, len(dev))
        watched = snapshot(dev, names, _INPLACE_CHECK_LIMIT)
        try:
            outcome = check_sample(run, logits, temperature, top_p, seed.seed, device_type, data.info["distribution"])
        except Exception as exc:
            return fail(f"raised {_first_line(exc)}")
        changed = first_change(dev, names, watched)
        return outcome if changed is None else fail(f"{unit.spec.op} modified its input {changed} in place")
    if data.check == "in_place":
        return _run_in_place(unit, data, dev_args, ref_args, tol)
    with torch.inference_mode():
        ref = unit.reference(*ref_args)
        names = argument_names(unit.reference, len(dev_args))
        watched = snapshot(dev_args, names, _INPLACE_CHECK_LIMIT)
        try:
            out = unit.impl(*dev_args)
        except Exception as exc:
            return fail(f"raised {_first_line(exc)}")
        changed = first_change(dev_args, names, watched)
        if changed is not None:
            return fail(f"{unit.spec.op} modified its input {changed} in place")
    if data.check == "routing":
        return compare_routing(out, ref, tol, device_type)
    msg = check_meta(out, ref, device_type)
    if msg:
        return fail(msg)
    return compare_tensors(out, ref, tol)


def _run_in_place(unit: Unit, data: CaseData, dev_args: tuple, ref_args: tuple, tol: Tolerance) -> Outcome:
    """An operator that writes argument ``data.info["writes"]``: both write their own copy of it, which
    is compared afterwards; it must return None and leave its other arguments as they were."""
    w = data.info["writes"]
    ref_args = ref_args[:w] + (data.args[w].clone(),) + ref_args[w + 1 :]
    if dev_args[w] is data.args[w]:  # .to(device) of a CPU tensor for a CPU backend is the tensor itself
        dev_args = dev_args[:w] + (data.args[w].clone(),) + dev_args[w + 1 :]
    names = argument_names(unit.reference, len(dev_args))
    with torch.inference_mode():
        unit.reference(*ref_args)
        watched = {key: v for key, v in snapshot(dev_args, names, _INPLACE_CHECK_LIMIT).items() if key[0] != w}
        try:
            out = unit.impl(*dev_args)
        except Exception as exc:
            return fail(f"raised {_first_line(exc)}")
        changed = first_change(dev_args, names, watched)
    if changed is not None:
        return fail(f"{unit.spec.op} modified its input {changed} in place")
    if out is not None:
        return fail(f"returned {type(out).__name__}, expected None (it writes argument {w}, {names[w]}, in place)")
    return compare_tensors(dev_args[w], ref_args[w], tol)


# ---------------------------------------------------------------------------------------- the report
@dataclass
class Row:
    """One table row: an operator in one format, mode and dtype, over its cases."""

    op: str
    label: str
    dtype: str
    cases: int = 0
    failed: int = 0
    max_abs: float = 0.0
    mean_abs: float = 0.0
    worst: float = 0.0
    tolerance: str = ""
    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0

    def add(self, case: Case, outcome: Outcome) -> None:
        n = self.cases
        self.cases += 1
        if not math.isnan(outcome.max_abs):
            self.max_abs = max(self.max_abs, outcome.max_abs)
            self.mean_abs = (self.mean_abs * n + outcome.mean_abs) / (n + 1)
        self.worst = max(self.worst, outcome.worst)
        if not outcome.ok:
            self.failed += 1
            self.failures.append(f"{case.name}: {outcome.message}")


@dataclass
class Report:
    """What ``dsv3 conformance`` prints (``format_table``) and writes (``to_dict``)."""

    backend: str
    device: str
    quick: bool
    rows: list[Row]
    fallbacks: list[str]
    errors: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(r.ok for r in self.rows)

    @property
    def n_cases(self) -> int:
        return sum(r.cases for r in self.rows)

    @property
    def checked_nothing(self) -> bool:
        """No case ran and nothing raised: the backend implements none of the operators asked for itself."""
        return self.n_cases == 0 and not self.errors

    def failures(self) -> list[str]:
        """One line per failed case: ``op[format] dtype, case NAME: what is wrong``."""
        out = [f"{label}: {msg}" for label, msg in self.errors]
        for r in self.rows:
            out.extend(f"{r.op}[{r.label}] {r.dtype}, case {f}" for f in r.failures)
        return out

    def failed_ops(self) -> set[str]:
        return {r.op for r in self.rows if not r.ok} | {label.split("[")[0] for label, _ in self.errors}

    def format_table(self) -> str:
        head = f"dsv3 conformance: backend {self.backend} (device {self.device}) against cpu_ref"
        lines = [head + (", quick cases" if self.quick else ""), ""]
        cols = (
            f"{'op':<22} {'format':<18} {'dtype':<9} {'cases':>5} {'max abs err':>12} {'mean abs err':>12} "
            f"{'err/tol':>8}  result"
        )
        lines += [cols, "-" * len(cols)]
        for r in self.rows:
            lines.append(
                f"{r.op:<22} {r.label:<18} {r.dtype:<9} {r.cases:>5} {r.max_abs:>12.3e} {r.mean_abs:>12.3e} "
                f"{r.worst:>8.3g}  {'pass' if r.ok else f'FAIL ({r.failed})'}"
            )
        if not self.rows:
            lines.append("(the backend implements no operator itself)")
        lines.append("")
        lines.append("falls back to cpu_ref: " + (", ".join(self.fallbacks) if self.fallbacks else "nothing"))
        fails = self.failures()
        if fails:
            lines += ["", "failures:"] + [f"  {f}" for f in fails]
        if self.checked_nothing:
            lines += ["", "NOTHING CHECKED: 0 cases (everything asked for falls back to cpu_ref)"]
            return "\n".join(lines)
        verdict = "PASS" if self.ok else f"FAIL ({len(fails)} failing, ops: {', '.join(sorted(self.failed_ops()))})"
        lines += ["", f"{verdict}: {self.n_cases} cases in {len(self.rows)} rows"]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        from .tolerances import TOLERANCES

        def num(x: float):
            return None if math.isnan(x) or math.isinf(x) else x

        return {
            "backend": self.backend,
            "device": self.device,
            "quick": self.quick,
            "ok": self.ok,
            "checked_nothing": self.checked_nothing,
            "cases": self.n_cases,
            "rows": [
                {
                    "op": r.op,
                    "format": r.label,
                    "dtype": r.dtype,
                    "cases": r.cases,
                    "failed": r.failed,
                    "max_abs_err": num(r.max_abs),
                    "mean_abs_err": num(r.mean_abs),
                    "err_over_tol": num(r.worst),
                    "tolerance": r.tolerance,
                    "ok": r.ok,
                    "failures": r.failures,
                }
                for r in self.rows
            ],
            "fallbacks": self.fallbacks,
            "failures": self.failures(),
            "tolerances": {t.name: {"rtol": t.rtol, "atol": t.atol, "why": t.why} for t in TOLERANCES},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def check_prepare_weight(backend: registry.Backend) -> list[Row]:
    """Rows for ``BackendInfo.prepare_weight``: a prepared weight must dequantize to the same values.

    Only weights cpu_ref can still read (same format and shapes, e.g. e4m3fn -> e4m3fnuz with doubled
    scales) are checked; a layout of the backend's own is exercised by the operator cases instead.
    """
    from ..backends.cpu_ref import quant
    from .cases import make_weight
    from .tolerances import FLOAT32

    prepare, device = backend.info.prepare_weight, backend.info.device
    rows = []
    if prepare is None:
        return rows
    for fmt in FORMATS:
        if fmt == HP:
            continue
        row = Row("prepare_weight", fmt, "float32", tolerance=FLOAT32.name)
        for name, shape in (("awkward", (200, 260)), ("experts", (3, 136, 200))):
            case = Case(name, f"{shape} {fmt} weight", lambda: None)
            w = make_weight(torch.Generator().manual_seed(len(rows)), shape, fmt, torch.float32)
            try:
                prepared = prepare(w.to(device))
            except Exception as exc:
                row.add(case, fail(f"raised {_first_line(exc)}"))
                continue
            if prepared is None or not _readable_by_reference(w, prepared):
                continue
            got = quant.dequantize(prepared.to("cpu"), torch.float32)
            row.add(case, compare_tensors(got, quant.dequantize(w, torch.float32), FLOAT32))
        if row.cases:
            rows.append(row)
    return rows


@dataclass(frozen=True)
class Item:
    """One (unit, case) pair: what a pytest item runs."""

    unit: Unit
    case: Case
    device: str
    prepare: Callable | None

    @property
    def id(self) -> str:
        return f"{self.unit.id}-{self.case.name}"

    def run(self) -> Outcome:
        return run_case(self.unit, self.case, self.device, self.prepare)


def iter_items(backend: registry.Backend, the_plan: Plan, quick: bool) -> Iterator[Item]:
    for unit in the_plan.units:
        for case in cases_for(unit.spec, quick):
            yield Item(unit, case, backend.info.device, backend.info.prepare_weight)


def run_conformance(
    backend: str | registry.Backend | object,
    quick: bool = False,
    ops: tuple[str, ...] | None = None,
    dtypes: tuple[torch.dtype, ...] = DEFAULT_DTYPES,
    progress: Callable[[str], None] | None = None,
    case_filter: Callable[[Case], bool] | None = None,
) -> Report:
    """Run every case of every operator the backend implements itself; never raises for a wrong op.

    backend: a name (``--backend``), a :class:`~dsv3.registry.Backend`, or a plugin object.
    case_filter: keep only the cases it accepts (e.g. leave out the 671B shapes under an interpreter).
    """
    chosen = load_backend(backend)
    unknown = [op for op in ops or () if op not in OP_NAMES]
    if unknown:
        raise Dsv3Error(f"unknown operator {unknown[0]!r}; operators: {', '.join(OP_NAMES)}")
    the_plan = plan(chosen, dtypes, ops)
    rows: dict[str, Row] = {}
    torch.manual_seed(0)
    for item in iter_items(chosen, the_plan, quick):
        if case_filter is not None and not case_filter(item.case):
            continue
        unit = item.unit
        tol = tolerance_for(unit.spec.op, unit.spec.fmt, unit.spec.act_quant, unit.spec.dtype)
        row = rows.setdefault(unit.id, Row(unit.spec.op, unit.label, dtype_name(unit.spec.dtype), tolerance=tol.name))
        if progress is not None:
            progress(f"{item.id}")
        try:
            outcome = item.run()
        except Exception as exc:  # a kit or reference failure: still named, never silent
            outcome = fail(f"the case could not run: {_first_line(exc)}")
        row.add(item.case, outcome)
    extra = check_prepare_weight(chosen) if ops is None else []
    return Report(
        chosen.name, chosen.info.device, quick, list(rows.values()) + extra, the_plan.fallbacks(), the_plan.errors
    )
