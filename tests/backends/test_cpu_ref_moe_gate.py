"""cpu_ref's MoE gate against transformers' DeepseekV3TopkRouter, k = 1 included (issue 24).

With ``norm_topk_prob`` the chosen weights are divided by their sum for every k, so at k = 1 the
weight is exactly ``routed_scaling_factor``: transformers (``if self.norm_topk_prob``), vLLM's
``grouped_topk`` (``if renormalize``) and the official inference/model.py (``if score_func ==
"sigmoid"``) all do so. dsv3 used to skip the division at k = 1 and return score x scale.

Tolerance: both sides compute the same float32 operations in the same order (sigmoid of one
matmul, a gather, one sum and one division, one product), except that the matmul's summation order
may differ: 1e-6 relative (a few float32 ulps of 2^-24) covers it. At k = 1 with normalization the
weight must be the scale exactly (s / (s + 1e-20) rounds to 1 for any score above ~1e-13).
"""

from __future__ import annotations

import pytest
import torch

from dsv3.backends.cpu_ref.moe import moe_gate
from dsv3.model.config import Routing

transformers = pytest.importorskip("transformers", reason="the reference router comes from transformers")
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter  # noqa: E402

E, D, N_GROUP, TOPK_GROUP, SCALE = 16, 48, 4, 2, 2.5


def hf_router(k: int, norm: bool, seed: int) -> DeepseekV3TopkRouter:
    cfg = transformers.DeepseekV3Config(
        hidden_size=D,
        n_routed_experts=E,
        num_experts_per_tok=k,
        n_group=N_GROUP,
        topk_group=TOPK_GROUP,
        norm_topk_prob=norm,
        routed_scaling_factor=SCALE,
    )
    router = DeepseekV3TopkRouter(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(E, D, generator=g) * D**-0.5)
        router.e_score_correction_bias.copy_(torch.randn(E, generator=g) * 0.3)  # non-zero, as DESIGN asks
    return router


@pytest.mark.parametrize("norm", [True, False], ids=["norm_topk_prob", "raw"])
@pytest.mark.parametrize("k", [1, 2, 8])
def test_gate_matches_transformers(k, norm):
    router = hf_router(k, norm, seed=k)
    x = torch.randn(33, D, generator=torch.Generator().manual_seed(100 + k))
    _, want_w, want_ids = router(x)
    routing = Routing(k, E, "sigmoid", N_GROUP, TOPK_GROUP, norm, SCALE, True)
    got_w, got_ids = moe_gate(x, router.weight.detach(), router.e_score_correction_bias, routing)
    # the same experts (transformers does not sort them): compare by expert id
    got_ids_s, got_order = got_ids.sort(-1)
    want_ids_s, want_order = want_ids.sort(-1)
    assert torch.equal(got_ids_s, want_ids_s)
    got_w, want_w = got_w.gather(-1, got_order), want_w.detach().gather(-1, want_order)
    torch.testing.assert_close(got_w, want_w, rtol=1e-6, atol=0)
    if k == 1 and norm:
        assert torch.equal(got_w, torch.full_like(got_w, SCALE))  # the scale itself, not score x scale
