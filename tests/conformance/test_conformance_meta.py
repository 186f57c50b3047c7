"""Contract meta-tests for the conformance kit: every hookspec has case generators, every case
builds, every (op, format, mode, dtype) has a stated tolerance.

(Docstrings and cpu_ref implementations of the hookspecs are checked in test_contract.py.)
"""

from __future__ import annotations

import pytest
import torch

from dsv3 import registry
from dsv3.conformance import CASE_GENERATORS, TOLERANCES, Spec, cases_for, run_conformance, tolerance_for, uncovered_ops
from dsv3.hookspecs import CONTRACT_VERSION, OP_NAMES, WEIGHT_OPS, BackendInfo, hookimpl
from dsv3.weights import ACT_QUANT_MODES, FORMATS, Weight


def specs(op: str):
    for dtype in (torch.float32, torch.bfloat16):
        for fmt in FORMATS if op in WEIGHT_OPS else ("hp",):
            for act_quant in ACT_QUANT_MODES:
                yield Spec(op, fmt, act_quant, dtype)


def test_case_table_covers_the_contract_exactly():
    assert set(CASE_GENERATORS) == set(OP_NAMES)
    assert uncovered_ops() == []


def test_a_new_hookspec_without_cases_is_reported():
    assert uncovered_ops((*OP_NAMES, "flash_decode")) == ["flash_decode"]

    class NewOp:  # a backend implementing an operator the kit has no cases for
        @hookimpl
        def dsv3_backend_info(self):
            return BackendInfo(name="new", description="new op", contract_version=CONTRACT_VERSION)

    report = run_conformance(registry.make_backend(NewOp(), "new"), ops=None, quick=True)
    assert report.ok  # nothing of its own: nothing to fail
    from dsv3.conformance import runner

    plan = runner.plan(registry.make_backend(NewOp(), "new"), ops=(*OP_NAMES[:1], "flash_decode"))
    assert plan.errors and plan.errors[0][0] == "flash_decode" and "no cases" in plan.errors[0][1]


@pytest.mark.parametrize("op", OP_NAMES)
def test_every_operator_has_tiny_and_671b_cases_in_every_format(op):
    for spec in specs(op):
        quick = cases_for(spec, quick=True)
        full = cases_for(spec)
        assert quick, f"{spec}: no quick cases"
        assert {c.name for c in quick} <= {c.name for c in full}
        assert any(c.name == "tiny" for c in quick), f"{spec}: no tiny case"
        assert any(c.name.startswith("671B") for c in full), f"{spec}: no 671B-shaped case"
        assert len({c.name for c in full}) == len(full), f"{spec}: duplicate case names"
        assert all(c.about for c in full)


@pytest.mark.parametrize("op", OP_NAMES)
def test_tiny_cases_build_deterministically(op):
    spec = next(specs(op))
    case = next(c for c in cases_for(spec, quick=True) if c.name == "tiny")
    a, b = case.build(), case.build()

    def tensors(args):
        for x in args:
            if isinstance(x, torch.Tensor):
                yield x
            elif isinstance(x, Weight):
                yield from (t for t in (x.data, x.scale) if t is not None)

    pairs = list(zip(tensors(a.args), tensors(b.args), strict=True))
    assert pairs
    for x, y in pairs:  # stale cache entries are NaN in both builds
        torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


def test_every_combination_has_a_justified_tolerance():
    names = {t.name for t in TOLERANCES}
    for op in OP_NAMES:
        for spec in specs(op):
            tol = tolerance_for(spec.op, spec.fmt, spec.act_quant, spec.dtype)
            assert tol.name in names and tol.why and tol.rtol >= 0
    assert tolerance_for("linear", "hp", "none", torch.float32).rtol == pytest.approx(1e-5)
    assert tolerance_for("embedding", "hp", "none", torch.bfloat16).rtol == 0
    assert (
        tolerance_for("linear", "fp8_block", "dynamic", torch.bfloat16).rtol
        > tolerance_for("linear", "fp8_block", "dynamic", torch.float32).rtol
    )
