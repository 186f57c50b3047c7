"""Generation on a tiny checkpoint: the two MLA forms, the KV cache, batching, sampling, EOS, limits.

"absorb" is the default absorbed form (latent cache; prefills attend in the naive form when that is
cheaper), "absorb-latent" the same with every token through the latent attention, "naive" the expanded
per-head cache.

Float32 comparisons use max |diff| <= 1e-5 x the largest logit: the paths compared compute the same
sums in a different order (absorbed vs expanded keys, a cache read vs a fresh tensor), which in
float32 drifts by ~1e-7 to 1e-6 of the scale; a wrong position, mask or cache slot moves logits by
far more.
"""

from __future__ import annotations

import pytest
import torch

import dsv3
from dsv3.errors import Dsv3Error
from dsv3.model.graph import naive_is_cheaper
from dsv3.runtime.generate import SamplingParams, generate

REL_TOL = 1e-5


FORMS = ("absorb", "absorb-latent", "naive")


def _load(path, form: str) -> dsv3.Engine:
    engine = dsv3.load(path, dtype="float32", attn_impl=form.removesuffix("-latent"), progress=False)
    engine.model.set_naive_prefill(not form.endswith("-latent"))
    return engine


@pytest.fixture(scope="module")
def engines(tiny_ckpt):
    return {form: _load(tiny_ckpt, form) for form in FORMS}


def _tokens(seed: int, b: int, t: int, vocab: int = 96) -> torch.Tensor:
    return torch.randint(2, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def _close(got: torch.Tensor, want: torch.Tensor) -> None:
    err, scale = float((got - want).abs().max()), float(want.abs().max())
    assert err <= REL_TOL * scale, f"max |diff| {err:.3g} vs scale {scale:.3g}"


def test_naive_and_absorbed_mla_agree(engines):
    tokens = _tokens(0, 2, 40)  # past the YaRN original length (32)
    naive = engines["naive"].logits(tokens)
    _close(engines["absorb-latent"].logits(tokens), naive)
    # the absorbed form's prefill runs the very same naive computation from its latents: same bits
    assert torch.equal(engines["absorb"].logits(tokens), naive)
    a, n = engines["absorb"].model.new_cache(1, 4), engines["naive"].model.new_cache(1, 4)
    cfg = engines["absorb"].cfg
    # the absorbed cache holds C + R values per token per layer; the naive one H x (Dqk + Dv)
    per_layer_absorb = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    per_layer_naive = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    assert a.nbytes_per_token() == cfg.num_hidden_layers * per_layer_absorb * 4
    assert n.nbytes_per_token() == cfg.num_hidden_layers * per_layer_naive * 4


@pytest.mark.parametrize("impl", FORMS)
def test_prefill_then_decode_equals_full_forward(engines, impl):
    model = engines[impl].model
    b, t = 2, 40
    tokens = _tokens(1, b, t)
    positions = torch.arange(t).expand(b, t)
    with torch.inference_mode():
        full = model.logits(model(tokens))  # (B, T, V), no cache
        cache = model.new_cache(b, t)
        # prefill 2, a chunk of 12 over them (absorbed: naive form over the cache), a chunk of 4 (absorbed:
        # latent form), then one token at a time
        chunks = [(0, 2), (2, 14), (14, 18)] + [(i, i + 1) for i in range(18, t)]
        cfg = engines[impl].cfg
        assert naive_is_cheaper(cfg, 12, 14) and not naive_is_cheaper(cfg, 4, 18)
        parts = [model.logits(model(tokens[:, s:e], positions[:, s:e], cache)) for s, e in chunks]
    _close(torch.cat(parts, dim=1), full)


@pytest.mark.parametrize("impl", FORMS)
def test_batched_generation_equals_one_by_one(engines, impl):
    engine = engines[impl]
    lengths = [3, 37, 12, 1]  # different lengths in one batch, one longer than the YaRN original length
    prompts = [_tokens(10 + i, 1, n)[0].tolist() for i, n in enumerate(lengths)]
    batched = engine.generate(prompts, max_new_tokens=10, temperature=0.0)
    single = [engine.generate([p], max_new_tokens=10, temperature=0.0)[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in single]
    assert all(len(r.token_ids) == 10 or r.finish_reason == "stop" for r in batched)


class _CountingOps:
    """An operator table that counts calls of the two attention operators."""

    def __init__(self, ops):
        self._ops = ops
        self.calls = {"attention": 0, "mla_latent_attention": 0, "mla_paged_attention": 0, "paged_cache_write": 0}

    def __getattr__(self, name):
        op = getattr(self._ops, name)
        if name not in self.calls:
            return op

        def counted(*args):
            self.calls[name] += 1
            return op(*args)

        return counted


@pytest.mark.parametrize("naive_prefill", [True, False])
def test_absorbed_prefill_form_follows_the_cost_rule(tiny_ckpt, naive_prefill):
    """With a latent cache, a 10-token prompt attends in the naive form; each decode step stays latent.

    Every forward writes the paged latent cache and, when latent, attends through its pages."""
    engine = _load(tiny_ckpt, "absorb" if naive_prefill else "absorb-latent")
    cfg, layers = engine.cfg, engine.cfg.num_hidden_layers
    assert naive_is_cheaper(cfg, 10, 10) and not naive_is_cheaper(cfg, 1, 11)
    counting = _CountingOps(engine.model.ops)
    for layer in engine.model.layers:
        layer.attn.ops = counting
    out = engine.generate([_tokens(6, 1, 10)[0].tolist()], max_new_tokens=4, temperature=0.0)[0]
    steps = len(out.token_ids) - 1  # forwards after the prefill
    assert steps >= 1
    prefill_naive = layers if naive_prefill else 0
    forwards = layers * (steps + 1)
    assert counting.calls == {
        "attention": prefill_naive,
        "mla_latent_attention": 0,
        "mla_paged_attention": forwards - prefill_naive,
        "paged_cache_write": forwards,
    }


def test_greedy_follows_the_full_forward_argmax(engines):
    """Each greedy token is the argmax of a cache-free forward over everything before it."""
    engine = engines["absorb"]
    prompt = _tokens(3, 1, 9)[0].tolist()
    out = engine.generate([prompt], max_new_tokens=6, temperature=0.0)[0].token_ids
    seq = prompt + out
    logits = engine.logits([seq[:-1]])[0]  # (T, V)
    assert logits[len(prompt) - 1 :].argmax(-1).tolist() == out


def test_sampling_is_reproducible_with_a_seed(engines):
    engine = engines["absorb"]
    prompts = [_tokens(4, 1, 6)[0].tolist(), _tokens(5, 1, 11)[0].tolist()]

    def run(seed, top_p=1.0):
        res = engine.generate(prompts, max_new_tokens=12, temperature=1.5, top_p=top_p, seed=seed)
        return [r.token_ids for r in res]

    assert run(123) == run(123)
    assert run(7, top_p=0.8) == run(7, top_p=0.8)
    draws = [run(seed) for seed in range(4)]
    assert any(d != draws[0] for d in draws[1:]), "different seeds gave identical samples"
    greedy = [r.token_ids for r in engine.generate(prompts, max_new_tokens=12, temperature=0.0)]
    assert any(d != greedy for d in draws), "temperature 1.5 never left the greedy path"


def test_eos_stops_only_its_row(engines):
    model = engines["absorb"].model
    prompts = [_tokens(20, 1, 5)[0].tolist(), _tokens(21, 1, 8)[0].tolist()]
    free = generate(model, prompts, SamplingParams(max_new_tokens=12, eos_ids=())).token_ids
    # pick as EOS a token that row 0 emits at some step j > 0 (first time) and row 1 never emits
    choice = next(
        ((j, tok) for j, tok in enumerate(free[0]) if j > 0 and tok not in free[0][:j] and tok not in free[1]),
        None,
    )
    assert choice is not None, f"no usable EOS candidate in {free}"
    j, eos = choice
    out = generate(model, prompts, SamplingParams(max_new_tokens=12, eos_ids=(eos,)))
    assert out.token_ids[0] == free[0][: j + 1] and out.finish_reasons[0] == "stop"
    assert out.token_ids[1] == free[1] and out.finish_reasons[1] == "length"


def test_prompt_longer_than_the_context_is_a_clear_error(engines):
    engine = engines["absorb"]
    limit = engine.cfg.max_position_embeddings
    with pytest.raises(Dsv3Error, match="max_position_embeddings") as err:
        engine.generate([[2] * (limit + 1)], max_new_tokens=1)
    assert str(limit + 1) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(Dsv3Error, match="max_position_embeddings"):
        engine.generate([[2] * 5, [2] * (limit - 3)], max_new_tokens=8)  # fits alone, not with the new tokens
    assert len(engine.generate([[2] * (limit - 4)], max_new_tokens=4)[0].token_ids) <= 4  # exactly fits


@pytest.mark.parametrize("mtp", [0, 1])
def test_a_top_p_that_keeps_no_token_samples_the_most_likely_one(engines, mtp):
    """top_p=1e-300 is 0 in float32: the nucleus keeps the most likely token (plain and speculative decoding);
    before, torch.multinomial raised on the all-zero row."""
    engine = engines["absorb"]
    prompts = [_tokens(6, 1, 5)[0].tolist(), _tokens(7, 1, 9)[0].tolist()]
    greedy = [r.token_ids for r in engine.generate(prompts, max_new_tokens=8, temperature=0.0, mtp=mtp)]
    tiny = engine.generate(prompts, max_new_tokens=8, temperature=1.0, top_p=1e-300, seed=5, mtp=mtp)
    assert [r.token_ids for r in tiny] == greedy


@pytest.mark.parametrize(
    ("kw", "param"),
    [
        (dict(temperature=float("nan")), "temperature"),  # before: silently greedy
        (dict(temperature=float("inf")), "temperature"),  # before: silently uniform
        (dict(temperature=1.0, seed=2**64), "seed"),  # before: ValueError from torch.Generator.manual_seed
    ],
)
@pytest.mark.parametrize("mtp", [0, 1])
def test_bad_sampling_parameters_are_a_clear_error(engines, kw, param, mtp):
    with pytest.raises(Dsv3Error, match=f"^{param} must ") as err:
        engines["absorb"].generate([[2, 3, 4]], max_new_tokens=2, mtp=mtp, **kw)
    assert "\n" not in str(err.value)
