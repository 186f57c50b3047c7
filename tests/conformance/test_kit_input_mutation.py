"""The kit's no-input-mutation check reaches into Weight arguments (``data`` and ``scale``).

Before, only plain tensor arguments were watched: a ``linear`` that computed the right answer and
then zeroed ``w.data`` passed every case. Planted backends wrap cpu_ref's own operator (so their
results are right) and then damage a weight; the kit must fail them and say which argument and field.
"""

from __future__ import annotations

import pytest
import torch

from dsv3 import registry
from dsv3.backends.cpu_ref import plugin as cpu_ref
from dsv3.conformance import run_conformance
from dsv3.conformance.inputs import argument_names, first_change, snapshot
from dsv3.hookspecs import CONTRACT_VERSION, BackendInfo, OpRequest, hookimpl
from dsv3.weights import FORMATS, FP8_BLOCK, HP, INT8_W8A8, INT8_WO, Weight


def after_cpu_ref(op: str, damage, fmts: tuple[str, ...]) -> registry.Backend:
    """A backend whose ``op`` (in ``fmts``) is cpu_ref's, followed by ``damage(*args)`` on its inputs."""

    class Plugin:
        @hookimpl
        def dsv3_backend_info(self) -> BackendInfo:
            return BackendInfo(
                name=f"damages_{op}",
                description=f"cpu_ref's {op}, then changes its inputs",
                contract_version=CONTRACT_VERSION,
                formats=FORMATS,
            )

    def hook(self, request: OpRequest):
        if request.fmt not in fmts:
            return None
        inner = getattr(cpu_ref, f"dsv3_op_{op}")(request)

        def impl(*args):
            out = inner(*args)
            damage(*args)
            return out

        return impl

    setattr(Plugin, f"dsv3_op_{op}", hookimpl(hook))
    return registry.make_backend(Plugin(), f"damages_{op}")


def failure_lines(report) -> list[str]:
    return [f for row in report.rows for f in row.failures]


def zero_data(x, w):
    w.data.zero_()


def rebind_data(x, w):
    w.data = torch.zeros_like(w.data)


def double_scale(x, w):
    w.scale.mul_(2)


@pytest.mark.parametrize(
    "damage, fmts, field",
    [
        (zero_data, FORMATS, "data"),
        (rebind_data, (HP, FP8_BLOCK), "data"),
        (double_scale, (FP8_BLOCK, INT8_W8A8, INT8_WO), "scale"),
    ],
    ids=["zero-data-in-place", "rebind-data", "scale-in-place"],
)
def test_a_linear_that_changes_its_weight_fails(damage, fmts, field):
    report = run_conformance(after_cpu_ref("linear", damage, fmts), quick=True, ops=("linear",))
    assert not report.ok and report.failed_ops() == {"linear"}
    assert {r.label.split("/")[0] for r in report.rows} == set(fmts)
    assert all(r.failed == r.cases for r in report.rows)  # every case, every format asked for
    lines = failure_lines(report)
    assert lines and all(f"linear modified its input argument 1 (w.{field}) in place" in f for f in lines), lines[:3]


def test_an_expert_weight_changed_after_computing_is_named():
    def damage(x, weights, ids, w1, w3, w2, offset):
        w2.scale.mul_(0.5)

    report = run_conformance(after_cpu_ref("moe_experts", damage, (INT8_W8A8,)), quick=True, ops=("moe_experts",))
    assert report.failed_ops() == {"moe_experts"}
    lines = failure_lines(report)
    assert lines and all("moe_experts modified its input argument 5 (w2.scale) in place" in f for f in lines)


def test_cpu_ref_wrapped_without_damage_still_passes():
    """The wrapper alone changes nothing: the failures above come from the damage, not the plumbing."""
    report = run_conformance(after_cpu_ref("linear", lambda x, w: None, FORMATS), quick=True, ops=("linear",))
    assert report.ok and report.n_cases > 0


def test_snapshot_reaches_into_tuples_and_nested_dataclasses():
    w = Weight(torch.ones(2, 3), FP8_BLOCK, torch.ones(1, 1))
    args = (torch.zeros(2), (w, [torch.arange(3)]), 1e-6)
    names = argument_names(lambda x, pair, eps: None, len(args))
    saved = snapshot(args, names, limit=1 << 20)
    assert first_change(args, names, saved) is None
    args[1][1][0][2] = 7
    assert first_change(args, names, saved) == "argument 1 (pair[1][0])"
    args[1][1][0][2] = 2
    w.scale = None
    assert first_change(args, names, saved) == "argument 1 (pair[0].scale)"
    w.scale = torch.ones(1, 1, dtype=torch.float64)  # equal values, another dtype: still a change
    assert first_change(args, names, saved) == "argument 1 (pair[0].scale)"
    w.scale = torch.ones(1, 1)
    w.fmt = HP
    assert first_change(args, names, saved) == "argument 1 (pair[0].fmt)"


def test_nan_inputs_are_watched_too():
    """Before, a tensor holding a NaN was skipped (NaN != NaN); bitwise comparison needs no exception."""
    x = torch.tensor([float("nan"), 1.0, -0.0])
    saved = snapshot((x,), ["x"], limit=16)
    assert first_change((x,), ["x"], saved) is None
    x[2] = 0.0  # -0.0 -> +0.0 is a write, though the values compare equal
    assert first_change((x,), ["x"], saved) == "argument 0 (x)"


def test_a_sampler_that_scales_its_logits_in_place_fails():
    """The sample cases were not watched at all before."""

    def damage(logits, temperature, top_p, generator):
        logits.div_(temperature.clamp(min=1e-3).unsqueeze(-1))

    report = run_conformance(after_cpu_ref("sample", damage, (HP,)), quick=True, ops=("sample",))
    assert report.failed_ops() == {"sample"}
    lines = failure_lines(report)
    assert lines and all("sample modified its input argument 0 (logits) in place" in f for f in lines), lines[:3]
