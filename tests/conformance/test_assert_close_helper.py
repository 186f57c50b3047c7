"""tests.helpers.assert_close: the conformance kit's comparison, with the bounds the tests state.

The hand-written checks it replaced were ``max |got - want| <= atol`` (logits) and
``max |got - want| <= tol * max(max|want|, 1)`` (single operators); an absolute tolerance must
draw the line at the same place, and NaN must still fail.
"""

from __future__ import annotations

import pytest
import torch

from dsv3.conformance.tolerances import EXACT, tolerance_for
from tests.helpers import absolute, assert_close

TOL = absolute("test", 2**-4, "a bound stated by a test (a power of two: the edge case below is exact)")


def test_absolute_bound_is_inclusive_and_exact_at_its_edge():
    want = torch.tensor([[1.0, -2.0, 0.0], [3.0, 0.5, -0.25]], dtype=torch.float64)
    assert_close(want + 2**-4, want, TOL)  # |diff| == atol passes, as `diff <= tol` did
    nudged = want + torch.tensor([0.0, 0.0, 2**-4 * (1 + 2**-20)], dtype=torch.float64)
    with pytest.raises(AssertionError, match=r"at \(0, 2\).* exceeds test tolerance 0.0625 = 0.0625 \(absolute\)"):
        assert_close(nudged, want, TOL)


def test_absolute_bound_gets_no_relative_allowance():
    """Large values do not widen an absolute bound (the kit's relative criterion would have)."""
    want = torch.full((4, 8), 1e3)
    with pytest.raises(AssertionError, match="exceeds"):
        assert_close(want + 0.07, want, TOL)


@pytest.mark.parametrize("where", ["got", "expected"])
def test_nan_or_inf_fails_even_in_the_same_place(where):
    want = torch.tensor([1.0, float("nan"), 2.0])
    with pytest.raises(AssertionError, match="non-finite"):
        assert_close(want.clone(), want, TOL)
    finite = torch.tensor([1.0, 0.0, 2.0])
    inf = torch.tensor([1.0, float("inf"), 2.0])
    got, exp = (inf, finite) if where == "got" else (finite, inf)
    with pytest.raises(AssertionError, match=f"{where} has 1 non-finite"):
        assert_close(got, exp, TOL)


def test_exact_compares_bits_and_shape_and_dtype_must_match():
    x = torch.tensor([0.0, 1.5])
    assert_close(x.clone(), x, EXACT)
    with pytest.raises(AssertionError, match="not bit-for-bit equal"):
        assert_close(torch.tensor([-0.0, 1.5]), x, EXACT)
    with pytest.raises(AssertionError, match="expected"):
        assert_close(x.double(), x, EXACT)
    with pytest.raises(AssertionError, match="expected"):
        assert_close(x[:1], x, EXACT)
    ids = torch.tensor([[3, 1], [0, 2]])
    assert_close(ids.clone(), ids, EXACT)
    with pytest.raises(AssertionError, match="not bit-for-bit"):
        assert_close(ids.flip(-1), ids, EXACT)


def test_a_kit_tolerance_is_applied_as_the_kit_applies_it():
    tol = tolerance_for("rms_norm", "hp", "none", torch.bfloat16)  # 2^-6 of (|ref| + row rms)
    want = torch.ones(2, 16, dtype=torch.bfloat16)
    assert_close(want * (1 + 2**-7), want, tol)
    with pytest.raises(AssertionError, match="bfloat16 tolerance"):
        assert_close(want * (1 + 2**-4), want, tol)
