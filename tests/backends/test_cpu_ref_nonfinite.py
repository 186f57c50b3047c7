"""cpu_ref's quantizers follow the non-finite rule of ``dsv3.weights`` (issue 24).

Each assertion is the rule's own statement, checked exactly (no tolerance: the rule fixes which
elements are NaN and which bytes hold them; finite groups must quantize bit for bit as if the
non-finite group were not there). The old code failed these: UE8M0 rounding turned inf and NaN
scales into 1.0, an inf group got an inf scale (its finite values quantized to +-0, finite output
after a clamp to 448 under UE8M0), and int8 cast NaN to whatever the platform gives.
"""

from __future__ import annotations

import math

import pytest
import torch

from dsv3.backends.cpu_ref import quant
from dsv3.quantize import round_scale_ue8m0
from dsv3.weights import FP8_BLOCK, INT8_W8A8, Weight

FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz
NAN_BYTES = {FN: (0x7F, 0xFF), FNUZ: (0x80,)}


def acts() -> torch.Tensor:
    """(4, 300): group 0 of row 0 holds a NaN, group 1 of row 1 a +inf, group 2 (partial) of row 2 a -inf."""
    x = torch.randn(4, 300, generator=torch.Generator().manual_seed(0))
    x[0, 3], x[1, 130], x[2, 299] = math.nan, math.inf, -math.inf
    return x


BAD = [(0, 0), (1, 1), (2, 2)]  # (row, group) holding a non-finite value


def test_ue8m0_rounding_keeps_inf_and_nan():
    s = torch.tensor([math.inf, math.nan, 3.0, 0.25, 2.0**-7 * (1 + 2**-23)])
    r = round_scale_ue8m0(s)
    assert r[0] == math.inf and math.isnan(r[1])  # the old code gave 1.0 for both
    assert r[2:].tolist() == [4.0, 0.25, 2.0**-6]


@pytest.mark.parametrize("fp8", [FN, FNUZ], ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_activation_group_with_nan_or_inf_is_nan(fp8, scale_fmt):
    x = acts()
    q, s = quant.quantize_act_fp8(x, 128, fp8, scale_fmt)
    bad = torch.zeros_like(s, dtype=torch.bool)
    for r, g in BAD:
        bad[r, g] = True
        codes = q[r, g * 128 : (g + 1) * 128].view(torch.uint8)
        assert math.isnan(s[r, g]), f"group ({r}, {g}): scale {s[r, g].item()}"
        assert all(int(c) in NAN_BYTES[fp8] for c in codes), f"group ({r}, {g}): codes {codes.unique().tolist()}"
    assert torch.isfinite(s[~bad]).all()
    # the finite groups are quantized as if the others were finite: zero the bad groups and compare bits
    clean = x.clone()
    for r, g in BAD:
        clean[r, g * 128 : (g + 1) * 128] = 1.0
    q2, s2 = quant.quantize_act_fp8(clean, 128, fp8, scale_fmt)
    assert torch.equal(s[~bad], s2[~bad])
    keep = (~bad).repeat_interleave(128, -1)[:, :300]
    assert torch.equal(q.view(torch.uint8)[keep], q2.view(torch.uint8)[keep])
    # dequantized and multiplied: the rows with a bad group are NaN everywhere, the finite row is finite
    w = quant.quantize_weight_fp8(torch.randn(136, 300, generator=torch.Generator().manual_seed(1)) * 0.05, 128, fp8)
    w = Weight(w.data, FP8_BLOCK, w.scale, 128, scale_fmt)
    y = quant.linear_fp8_dynamic(x, w)
    assert y[:3].isnan().all() and torch.isfinite(y[3]).all()


def test_int8_activation_row_with_nan_or_inf_is_a_nan_scale_and_zeros():
    x = acts()
    q, s = quant.quantize_act_int8(x)
    assert s[:3].isnan().all() and torch.isfinite(s[3])
    assert (q[:3] == 0).all()
    w = quant.quantize_weight_int8(torch.randn(136, 300, generator=torch.Generator().manual_seed(2)) * 0.05)
    y = quant.linear_int8_dynamic(x, w)
    assert y[:3].isnan().all() and torch.isfinite(y[3]).all()  # NaN, not +-inf, in every output of rows 0-2


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_weight_tile_with_nan_or_inf_is_nan(scale_fmt):
    w = torch.randn(260, 300, generator=torch.Generator().manual_seed(3)) * 0.05
    w[5, 7], w[200, 140] = math.nan, -math.inf  # tiles (0, 0) and (1, 1)
    qw = quant.quantize_weight_fp8(w, 128, FN, scale_fmt)
    bad = torch.zeros(3, 3, dtype=torch.bool)
    bad[0, 0] = bad[1, 1] = True
    assert qw.scale[bad].isnan().all() and torch.isfinite(qw.scale[~bad]).all()
    deq = quant.dequantize(qw, torch.float32)
    tile_bad = bad.repeat_interleave(128, 0).repeat_interleave(128, 1)[:260, :300]
    assert deq[tile_bad].isnan().all() and torch.isfinite(deq[~tile_bad]).all()


def test_int8_weight_row_with_nan_or_inf_is_nan():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(4))
    w[1, 3], w[4, 0] = math.nan, math.inf
    qw = quant.quantize_weight_int8(w, INT8_W8A8)
    assert qw.scale[[1, 4]].isnan().all() and (qw.data[[1, 4]] == 0).all()
    assert torch.isfinite(qw.scale[[0, 2, 3, 5]]).all()
    deq = quant.dequantize(qw, torch.float32)
    assert deq[[1, 4]].isnan().all() and torch.isfinite(deq[[0, 2, 3, 5]]).all()


def test_stored_inf_and_nan_scales_are_applied_as_stored():
    qw = quant.quantize_weight_fp8(torch.randn(256, 256, generator=torch.Generator().manual_seed(5)) * 0.05)
    qw.scale[0, 1], qw.scale[1, 0] = math.inf, math.nan
    deq = quant.dequantize(qw, torch.bfloat16)
    assert deq[:128, 128:].isinf().any() and not torch.isfinite(deq[:128, 128:]).any()  # +-inf, NaN where q = 0
    assert deq[128:, :128].isnan().all() and torch.isfinite(deq[:128, :128]).all()
