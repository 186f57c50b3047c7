"""The MTP training objective (dsv3.tools.training): indexing, weighting, gradients, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import dsv3
from dsv3.errors import Dsv3Error
from dsv3.tools.training import lm_and_mtp_loss, mtp_loss


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_loss_matches_step_by_step_cached_mtp(tiny_ckpt, attn_impl):
    """Depth 0 predicts token i+2 from the main hidden at i and token i+1: recomputed with the cache."""
    model = dsv3.load(tiny_ckpt, dtype="float32", attn_impl=attn_impl).model
    tokens = torch.randint(2, model.cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    total, main_ce, mtp_ce = lm_and_mtp_loss(model, tokens, 0.25)

    with torch.no_grad():
        b, t = tokens.shape
        cache = model.new_cache(b, t)
        hidden = model(tokens, torch.arange(t).expand(b, t), cache)  # (B, T, D)
        main_ref = F.cross_entropy(model.logits(hidden[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten())
        logits = []
        for i in range(t - 2):  # one position at a time through the MTP layer's own cache
            pos = torch.full((b, 1), i)
            out = model.mtp_forward(0, hidden[:, i : i + 1], tokens[:, i + 1 : i + 2], pos, cache)
            logits.append(model.mtp[0].logits(out[:, 0]))
        mtp_ref = F.cross_entropy(torch.stack(logits, 1).flatten(0, 1), tokens[:, 2:].flatten())
    # fp32 throughout: 1e-5 relative covers the different summation orders of cached vs full attention
    torch.testing.assert_close(main_ce, main_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mtp_ce, mtp_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(total, main_ce + 0.25 * mtp_ce)
    torch.testing.assert_close(mtp_loss(model, tokens, hidden, 0.5), 0.5 * mtp_ref, rtol=1e-5, atol=1e-5)


def test_gradients_reach_main_and_mtp_weights(tiny_ckpt):
    model = dsv3.load(tiny_ckpt, dtype="float32").model
    model.train()
    tokens = torch.randint(2, model.cfg.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    total, _, mtp_ce = lm_and_mtp_loss(model, tokens, 0.3)
    assert mtp_ce.item() > 0
    total.backward()
    for name in ("mtp.0.eh_proj.weight", "mtp.0.block.attn.wkv_a.weight", "layers.0.attn.wq_a.weight"):
        grad = dict(model.named_parameters())[name].grad
        assert grad is not None and grad.abs().sum() > 0, name


def test_mtp_weight_without_mtp_layers_is_an_error(tmp_path):
    from tests.helpers import make_checkpoint

    model = dsv3.load(make_checkpoint(tmp_path / "plain", mtp=False), dtype="float32").model
    assert len(model.mtp) == 0
    tokens = torch.randint(2, model.cfg.vocab_size, (1, 6))
    total, main_ce, mtp_ce = lm_and_mtp_loss(model, tokens, 0.0)
    assert mtp_ce.item() == 0 and torch.equal(total, main_ce)
    with pytest.raises(Dsv3Error, match="no MTP layers"):
        lm_and_mtp_loss(model, tokens, 0.3)
