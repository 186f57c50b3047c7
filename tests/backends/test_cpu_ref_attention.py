"""cpu_ref's attention operators ignore cache entries past every query's position, even NaN/inf ones.

A serving slot is reused by starting the next request at position 0: entries past its position are
stale (possibly NaN from an earlier request that overflowed). Masked keys get probability 0, but
0 * NaN is NaN, so the reference zeroes those values before ``probs @ v``. Compared here with the
same inputs holding zeros there: float32, same operations on the same finite values, so equal bits.
"""

from __future__ import annotations

import torch

from dsv3.backends.cpu_ref import attention as ref
from dsv3.conformance.tolerances import EXACT
from tests.helpers import assert_close


def _poisoned(x: torch.Tensor, last: torch.Tensor, value: float) -> torch.Tensor:
    """x (B, S, ...) with entries past position last[b] set to value."""
    past = torch.arange(x.shape[1]) > last.view(-1, 1)  # (B, S)
    return x.masked_fill(past.view(*past.shape, *([1] * (x.dim() - 2))), value)


def test_stale_nan_past_each_row_position_changes_nothing():
    g = torch.Generator().manual_seed(0)
    b, t, h, s, c, r, dqk, dv = 2, 3, 4, 11, 16, 4, 12, 8
    q_pos = torch.tensor([[4, 5, 6], [0, 1, 2]])  # row 0 chunked onto a cache, row 1 a fresh prompt
    last = q_pos.amax(1)

    q, k, v = (
        torch.randn(b, t, h, dqk, generator=g),
        torch.randn(b, s, h, dqk, generator=g),
        torch.randn(b, s, h, dv, generator=g),
    )
    clean = ref.attention(q, _poisoned(k, last, 0.0), _poisoned(v, last, 0.0), q_pos, 0.3)
    stale = ref.attention(q, _poisoned(k, last, float("nan")), _poisoned(v, last, float("inf")), q_pos, 0.3)
    assert_close(stale, clean, EXACT, "attention over a stale NaN/inf cache")  # finite, and equal bits

    ql, qp = torch.randn(b, t, h, c, generator=g), torch.randn(b, t, h, r, generator=g)
    kv, pe = torch.randn(b, s, c, generator=g), torch.randn(b, s, r, generator=g)
    clean = ref.mla_latent_attention(ql, qp, _poisoned(kv, last, 0.0), _poisoned(pe, last, 0.0), q_pos, 0.3)
    stale = ref.mla_latent_attention(
        ql, qp, _poisoned(kv, last, float("nan")), _poisoned(pe, last, float("nan")), q_pos, 0.3
    )
    assert_close(stale, clean, EXACT, "mla_latent_attention over a stale NaN cache")
