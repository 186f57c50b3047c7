"""Sampling parameters: one check (``SamplingParams.validate``) that Engine.generate, ``dsv3 run`` and the
server share, and a sample op that never fails on a legal top_p or temperature.

A top_p that no token reaches (0, or a positive float that rounds to 0 in float32) keeps the most
likely token, as vLLM does; a positive temperature too small for ``logits / T`` to stay finite
samples the argmax. Before, both made ``torch.multinomial`` raise on an all-zero or NaN row.
"""

from __future__ import annotations

import pytest
import torch

from dsv3.backends.cpu_ref.basic import sample
from dsv3.errors import Dsv3Error
from dsv3.runtime.generate import SEED_RANGE, SamplingError, SamplingParams
from dsv3.runtime.speculative import processed_probs
from dsv3.runtime.text import check_text

LOGITS = torch.tensor([[0.5, 3.0, -1.0, 2.9], [1.0, 1.0, 4.0, 0.0]])  # argmax 1 (close to 3) and 2
ARGMAX = [1, 2]


def _draws(temperature: float, top_p: float, n: int = 20) -> set[tuple[int, ...]]:
    g = torch.Generator().manual_seed(0)
    t, p = torch.full((2,), temperature), torch.full((2,), top_p)  # float32, as the callers pass them
    return {tuple(sample(LOGITS, t, p, g).tolist()) for _ in range(n)}


@pytest.mark.parametrize("top_p", [0.0, 1e-300])  # 1e-300 is 0 in float32
def test_a_top_p_that_no_token_reaches_keeps_the_most_likely(top_p):
    assert _draws(1.0, top_p) == {tuple(ARGMAX)}
    # the speculative decoder's p and q: the same rule
    probs = processed_probs(LOGITS, torch.ones(2), torch.full((2,), top_p))
    assert torch.equal(probs, torch.eye(4)[ARGMAX])


def test_a_tiny_positive_temperature_samples_the_argmax():
    assert _draws(1e-40, 1.0) == {tuple(ARGMAX)}  # a float32 subnormal: logits / T alone overflows to inf
    probs = processed_probs(LOGITS, torch.full((2,), 1e-40), torch.ones(2))
    assert torch.equal(probs, torch.eye(4)[ARGMAX])


def test_the_nucleus_is_unchanged_for_ordinary_values():
    """softmax(logits / T) over the smallest top set reaching top_p, renormalized (computed here in float64)."""
    t, top_p = 0.7, 0.8
    probs = torch.softmax(LOGITS.double() / t, -1)
    want = torch.zeros_like(probs)
    for row in range(2):
        order = probs[row].argsort(descending=True)
        kept = order[: int((probs[row][order].cumsum(0) < top_p).sum()) + 1]
        want[row, kept] = probs[row, kept] / probs[row, kept].sum()
    got = processed_probs(LOGITS, torch.full((2,), t), torch.full((2,), top_p))
    assert (want > 0).sum() == 3  # row 0 keeps two tokens, row 1 one: the cut is exercised
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=1e-7)


BAD = [
    (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature"),
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature="0.5"), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(seed=2**64), "seed"),
    (dict(seed=-(2**63) - 1), "seed"),
    (dict(seed=1.5), "seed"),
    (dict(seed=True), "seed"),
    (dict(max_new_tokens=0), "max_new_tokens"),
]


@pytest.mark.parametrize(("kw", "param"), BAD)
def test_a_bad_parameter_is_one_line_naming_it(kw, param):
    with pytest.raises(SamplingError) as err:
        SamplingParams(**kw).validate()
    assert isinstance(err.value, Dsv3Error) and err.value.param == param
    assert str(err.value).startswith(f"{param} must ") and "\n" not in str(err.value)


@pytest.mark.parametrize("seed", [-1, SEED_RANGE[0], 2**63, SEED_RANGE[1] - 1])
def test_every_seed_torch_takes_is_valid_and_a_negative_one_wraps(seed):
    assert SamplingParams(temperature=1.0, top_p=1e-300, seed=seed).validate().seed == seed
    g = torch.Generator().manual_seed(seed)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(seed % 2**64)))


@pytest.mark.parametrize("text", ["a \ud800 b", "\udcff", "x\udfff"])
def test_text_with_a_lone_surrogate_is_refused(text):
    with pytest.raises(Dsv3Error, match=r"^--prompt is not valid Unicode: a lone surrogate"):
        check_text(text, "--prompt")


def test_valid_text_passes_and_bytes_are_refused():
    assert check_text("é 😀 \U0010ffff", "p") == "é 😀 \U0010ffff"
    with pytest.raises(Dsv3Error, match="must be text, not bytes"):
        check_text(b"hello", "prompt")


def test_masked_logits_pass_and_rows_with_nothing_to_draw_are_refused():
    """-inf is a masked token (the sample op's conformance case 'masked'); NaN, +inf or a row of -inf is not."""
    from dsv3.runtime.sampling import finite_logits

    ninf = float("-inf")
    ok = torch.tensor([[0.5, ninf, 1.0], [ninf, 2.0, ninf]])
    assert finite_logits(ok) is ok
    for bad in ([[0.5, float("nan"), 1.0]], [[0.5, float("inf"), 1.0]], [[ninf, ninf, ninf]]):
        with pytest.raises(Dsv3Error, match="logits hold inf or NaN"):
            finite_logits(torch.tensor(bad))
