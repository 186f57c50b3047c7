"""dsv3.tools.eval without a model: the strided windows, the per-position figures and their summary.

The figures are checked against independent formulas (torch's kl_div, a bigram model's exact
perplexity); identical logits must give KL exactly 0 and 100% agreement (float64 throughout).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dsv3.errors import Dsv3Error
from dsv3.tools.eval import evaluate, position_stats, strided_windows


@pytest.mark.parametrize(("n", "context", "stride"), [(2, 2, 1), (10, 4, 2), (37, 8, 3), (64, 16, 16), (65, 16, 8)])
def test_windows_score_every_target_once(n, context, stride):
    windows = strided_windows(n, context, stride)
    scored = [t for w in windows for t in range(w.first_target, w.end)]
    assert len(scored) == len(set(scored)), "a target scored twice"
    assert windows[-1].end == n
    for w in windows:
        assert w.begin < w.first_target <= w.end and w.length <= context
    expected = set(range(1, n))
    if stride == context:  # non-overlapping: a later window's first token has no context inside it
        expected -= {w.begin for w in windows[1:]}
    assert set(scored) == expected
    if stride < context:  # each target (after the first window) sees context - stride earlier tokens
        for w in windows[1:]:
            assert w.first_target - w.begin >= context - stride


def test_windows_reject_bad_sizes():
    with pytest.raises(Dsv3Error, match="--stride"):
        strided_windows(10, 4, 5)
    with pytest.raises(Dsv3Error, match="--context"):
        strided_windows(10, 1, 1)
    with pytest.raises(Dsv3Error, match="at least 2 tokens"):
        strided_windows(1, 4, 2)


def test_kl_matches_torch_kl_div_and_is_zero_for_identical_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 33, generator=g) * 3
    other = logits + 0.3 * torch.randn(50, 33, generator=g)
    targets = torch.randint(0, 33, (50,), generator=g)
    stats = position_stats(other, targets, logits)  # test = other, reference = logits
    lp_ref, lp_test = logits.double().log_softmax(-1), other.double().log_softmax(-1)
    want = F.kl_div(lp_test, lp_ref, log_target=True, reduction="none").sum(-1)  # KL(ref || test)
    torch.testing.assert_close(stats.kld, want, rtol=1e-12, atol=1e-15)
    assert (stats.kld > 0).all()
    same = position_stats(logits.clone(), targets, logits)
    assert torch.equal(same.kld, torch.zeros(50, dtype=torch.float64))
    assert bool(same.same_top1.all())
    torch.testing.assert_close(same.nll, -lp_ref.gather(-1, targets[:, None]).squeeze(-1), rtol=0, atol=0)


def test_kl_ignores_zero_probability_reference_tokens():
    ref = torch.tensor([[0.0, 0.0, -math.inf]])
    test = torch.tensor([[0.0, 1.0, 2.0]])
    stats = position_stats(test, torch.tensor([0]), ref)
    lp = test.double().log_softmax(-1)[0]
    want = 0.5 * (math.log(0.5) - float(lp[0])) + 0.5 * (math.log(0.5) - float(lp[1]))
    assert math.isclose(float(stats.kld[0]), want, rel_tol=1e-12)


def _bigram(table: torch.Tensor):
    """A context-free model: logits at t depend only on token t, so windows cannot change the result."""
    return lambda tokens: table[tokens]  # (B, T) -> (B, T, V)


def test_strided_perplexity_of_a_bigram_model_is_exact():
    g = torch.Generator().manual_seed(1)
    v = 17
    table, table2 = torch.randn(v, v, generator=g), torch.randn(v, v, generator=g)
    tokens = torch.randint(0, v, (101,), generator=g)
    lp = table.double().log_softmax(-1)
    want_nll = -lp[tokens[:-1], tokens[1:]].mean()
    for context, stride, batch in [(101, 101, 1), (16, 5, 3), (8, 8, 2)]:
        report = evaluate(_bigram(table), tokens, context, stride, batch=batch, progress=False)
        if stride < context:
            assert report.n_scored == 100
            assert math.isclose(report.ppl, math.exp(float(want_nll)), rel_tol=1e-12)
        else:  # window starts unscored
            assert report.n_scored == 100 - (len(range(0, 100, stride)) - 1)
        assert not report.has_reference
    same = evaluate(_bigram(table), tokens, 16, 5, reference=_bigram(table.clone()), batch=4, progress=False)
    assert same.kld_mean == 0.0 and same.kld_max == 0.0 and same.top1_agreement == 100.0
    assert same.ppl_ratio == 1.0 and same.rms_delta_p == 0.0
    diff = evaluate(_bigram(table2), tokens, 16, 5, reference=_bigram(table), progress=False)
    lp2 = table2.double().log_softmax(-1)
    per_token = (lp.exp() * (lp - lp2)).sum(-1)[tokens[:-1]]  # KL(ref || test) at each position
    assert math.isclose(diff.kld_mean, float(per_token.mean()), rel_tol=1e-12)
    assert math.isclose(diff.kld_max, float(per_token.max()), rel_tol=1e-12)
    assert math.isclose(diff.kld_median, float(per_token.quantile(0.5)), rel_tol=1e-12)
    top_same = (table.argmax(-1) == table2.argmax(-1))[tokens[:-1]]
    assert math.isclose(diff.top1_agreement, 100.0 * float(top_same.double().mean()), rel_tol=1e-12)
    assert math.isclose(diff.ppl / diff.ppl_ref, diff.ppl_ratio, rel_tol=1e-12)


def test_nonfinite_logits_are_counted_and_json_safe():
    table = torch.randn(5, 5)
    bad = table.clone()
    bad[3] = math.nan
    tokens = torch.tensor([0, 3, 1, 3, 2])
    report = evaluate(_bigram(bad), tokens, 5, 5, reference=_bigram(table), progress=False)
    assert report.nonfinite == 2
    assert math.isnan(report.kld_mean)
    assert report.to_dict()["kld_mean"] is None
    assert "non-finite" in report.format_text()
