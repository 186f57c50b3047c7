"""The logits-processing stage (penalties, logit_bias, top_k, min_p, min_tokens, stop_token_ids) in plain and
speculative (MTP) decoding.

Every expectation is computed here by hand, in float64, from the raw logits (random ones, or the model's
uncached ``Engine.logits``) and the token counts, with loops rather than the stage's tensor arithmetic.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import dsv3
from dsv3.runtime.generate import SamplingError, SamplingParams, generate
from dsv3.runtime.logits_processing import LogitsParams, RowLogits, logit_bias_of, penalize, process, truncate
from dsv3.runtime.speculative import generate_speculative
from tests.helpers import make_checkpoint, pattern_tokens, train_on_patterns

# float32 stage vs float64 reference: a few roundings of values |x| < 20 (2^-24 relative each)
ATOL, RTOL = 1e-5, 1e-6
# the decode path (cached, batched) vs one uncached forward moves float32 logits by ~1e-6; a token the
# stage picked as argmax must be within this of the reference's maximum
ARGMAX_TOL = 1e-4
VOCAB = 16
EOS = 1
PENALTIES = LogitsParams(
    presence_penalty=0.6, frequency_penalty=0.9, repetition_penalty=1.7, logit_bias={4: 1.5, 9: -2.0}
)


def expected_logits(
    raw: torch.Tensor, prompt: list[int], generated: list[int], p: LogitsParams, stop_ids=()
) -> torch.Tensor:
    """The documented processing, by hand: raw (V,) -> penalized (V,) float64."""
    x = raw.double().clone()
    for t, b in p.logit_bias.items():
        x[t] += b
    if len(generated) < p.min_tokens:
        for t in stop_ids:
            x[t] = -math.inf
    for t in set(prompt) | set(generated):  # repetition: prompt and generated
        x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
    for t, c in Counter(generated).items():  # frequency and presence: generated only
        x[t] -= p.frequency_penalty * c + p.presence_penalty
    return x


def expected_kept(x: torch.Tensor, p: LogitsParams, temperature: float) -> set[int]:
    """Tokens top_k and min_p keep of penalized logits x (V,) at temperature T > 0."""
    probs = torch.softmax(x.double() / temperature, -1)
    ranked = sorted(range(len(x)), key=lambda t: -float(x[t]))
    kept = set(ranked) if p.top_k <= 0 else {t for t in ranked if x[t] >= x[ranked[min(p.top_k, len(x)) - 1]]}
    return {t for t in kept if probs[t] >= p.min_p * probs.max()}


# ----------------------------------------------------------------- the stage on its own
def test_penalize_equals_the_hand_computation_at_every_drafted_position():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 4, VOCAB, generator=g) * 4  # (B, P, V): a verify step over 3 drafts
    drafts = torch.randint(0, VOCAB, (4, 3), generator=g)
    drafts[0] = torch.tensor([11, 11, 7])  # a new token drafted twice (counts 1 then 2), then a generated one
    drafts[3] = torch.tensor([6, 9, 6])  # 6 is in the prompt, 9 is new
    prompts = [[0, 3, 5, 5], [0, 2], [0, 6, 8], [0, 6]]
    generated = [[7, 3], [], [5, 1, 1], [2]]
    params = [PENALTIES, None, LogitsParams(logit_bias={2: 3.0}, min_tokens=5), LogitsParams(repetition_penalty=0.5)]
    rows = [
        None if p is None else RowLogits(p, pr, [EOS, 6], VOCAB, "cpu", generated=gen)
        for p, pr, gen in zip(params, prompts, generated, strict=True)
    ]
    before = logits.clone()
    out = penalize(logits, rows, drafts)
    assert torch.equal(logits, before)  # the input is not changed
    assert torch.equal(out[1], logits[1])  # the unprocessed row is untouched
    for i in (0, 2, 3):
        for pos in range(4):
            history = generated[i] + drafts[i, :pos].tolist()
            want = expected_logits(logits[i, pos], prompts[i], history, params[i], [EOS, 6])
            torch.testing.assert_close(out[i, pos].double(), want, atol=ATOL, rtol=RTOL)
    # row 2: 3 generated, min_tokens 5: positions 0 and 1 (3 and 4 generated) mask the stops, 2 and 3 do not
    assert out[2, :2, [EOS, 6]].isneginf().all() and out[2, 2:, [EOS, 6]].isfinite().all()
    # the drafter's view: one position after all j earlier drafts equals the verifier's position j
    for j in range(4):
        one = penalize(logits[:, j], rows, drafts[:, :j])
        torch.testing.assert_close(one, out[:, j])


def test_rows_without_processing_cost_nothing():
    logits = torch.randn(2, VOCAB)
    plain = RowLogits(LogitsParams(top_k=3), [0], [EOS], VOCAB, "cpu", temperature=0.0)  # greedy: top_k is a no-op
    assert penalize(logits, [None, None]) is logits
    assert truncate(logits, [None, plain], torch.zeros(2)) is logits
    assert process(logits, None, torch.ones(2)) == (logits, logits)
    assert not LogitsParams().active and LogitsParams(top_k=-1).active is False


@pytest.mark.parametrize("top_k, min_p, temperature", [(3, 0.0, 1.0), (0, 0.2, 0.7), (4, 0.1, 2.0), (100, 0.0, 1.0)])
def test_truncate_keeps_the_top_k_and_the_min_p_tokens(top_k, min_p, temperature):
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, VOCAB, generator=g) * 2
    p = LogitsParams(top_k=top_k, min_p=min_p)
    rows = [RowLogits(p, [0], [], VOCAB, "cpu", temperature=temperature), None]
    out = truncate(logits, rows, torch.tensor([temperature, 1.0]))
    kept = {t for t in range(VOCAB) if torch.isfinite(out[0, t])}
    assert kept == expected_kept(logits[0], p, temperature)
    assert 0 < len(kept) < VOCAB or top_k == 100
    assert torch.equal(out[0][list(kept)], logits[0][list(kept)]) and torch.equal(out[1], logits[1])


BAD = [
    (dict(presence_penalty=2.5), "presence_penalty"),
    (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty"),
    (dict(repetition_penalty=1e-300), "repetition_penalty"),  # 0 in float32: logits / r would be inf
    (dict(repetition_penalty=1e308), "repetition_penalty"),
    (dict(logit_bias={VOCAB: 1.0}), "logit_bias"),
    (dict(logit_bias={3: 101}), "logit_bias"),
    (dict(top_k=-2), "top_k"),
    (dict(top_k=2.0), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(min_tokens=-1), "min_tokens"),
    (dict(min_tokens=9), "min_tokens"),  # more than max_tokens 8
]


@pytest.mark.parametrize(("fields", "param"), BAD)
def test_bad_params_name_the_field(fields, param):
    with pytest.raises(SamplingError) as err:
        LogitsParams(**fields).validate(VOCAB, max_tokens=8)
    assert err.value.param == param
    with pytest.raises(SamplingError, match="stop_token_ids"):
        SamplingParams(8, stop_token_ids=(VOCAB,)).validate(VOCAB)


def test_logit_bias_keys_as_the_openai_client_sends_them():
    assert logit_bias_of({"5": 100, "12": -1.5, 3: 2}) == {5: 100.0, 12: -1.5, 3: 2.0}
    for bad in ({"x": 1}, {"5": "1"}, {" 5": 1}, {"5.0": 1}, [1]):
        with pytest.raises(SamplingError, match="logit_bias"):
            logit_bias_of(bad)


# ----------------------------------------------------------------- in generation
@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A tiny vocab-16 checkpoint with an MTP layer, trained so that drafts are often right."""
    path = make_checkpoint(tmp_path_factory.mktemp("procs") / "ckpt", seed=3, mtp=True, vocab_size=VOCAB)
    eng = dsv3.load(path, dtype="float32")
    train_on_patterns(eng.model, steps=60, seed=0)
    return eng


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    prompts = [[0] + pattern_tokens(1, n, VOCAB, g)[0].tolist() for n in (2, 6, 3)]
    return prompts + [[0, 9, 4, 4, 13, 2, 7, 7, 3]]


def _greedy(engine, prompts, n, logits=None, stop_token_ids=(), mtp=0):
    params = SamplingParams(n, 0.0, 1.0, None, (EOS,), logits or LogitsParams(), tuple(stop_token_ids))
    run = generate_speculative if mtp else generate
    return run(engine.model, prompts, params, *([mtp] if mtp else []))


def test_greedy_penalized_tokens_are_the_argmax_of_the_hand_processed_logits(engine):
    prompts = _prompts()
    out = _greedy(engine, prompts, 12, PENALTIES)
    plain = _greedy(engine, prompts, 12)
    assert out.token_ids != plain.token_ids  # the penalties changed what was generated
    for prompt, gen in zip(prompts, out.token_ids, strict=True):
        raw = engine.logits([prompt + gen])[0]  # (T, V): row t predicts token t + 1
        for j, t in enumerate(gen):
            want = expected_logits(raw[len(prompt) + j - 1], prompt, gen[:j], PENALTIES)
            assert want[t] >= want.max() - ARGMAX_TOL, (prompt, j)


def test_a_large_logit_bias_forces_its_token_and_the_drafts_follow_it(engine):
    forced = LogitsParams(logit_bias={11: 100})
    for mtp in (0, 2):
        out = _greedy(engine, _prompts(), 8, forced, mtp=mtp)
        assert all(row == [11] * 8 for row in out.token_ids)
    # the MTP drafter processes its logits too: with the bias every draft is 11 and is accepted
    assert out.stats["mtp"]["acceptance_rate"] == [1.0, 1.0]


def test_min_tokens_holds_the_stop_ids_back_and_stop_token_ids_end_there(engine):
    prompt = [_prompts()[1]]
    free = _greedy(engine, prompt, 10).token_ids[0]
    first = free[0]
    stopped = _greedy(engine, prompt, 10, stop_token_ids=[first])
    assert stopped.token_ids == [[first]] and stopped.finish_reasons == ["stop"]
    later = next(t for j, t in enumerate(free) if j >= 2 and t not in free[:j])  # first seen at index j >= 2
    cut = _greedy(engine, prompt, 10, stop_token_ids=[later])
    assert cut.token_ids == [free[: free.index(later) + 1]] and cut.finish_reasons == ["stop"]
    for mtp in (0, 2):
        held = _greedy(engine, prompt, 10, LogitsParams(min_tokens=4), [first], mtp=mtp)
        toks = held.token_ids[0]
        assert len(toks) >= 4 and first not in toks[:4] and EOS not in toks[:4]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_mtp_with_processing_equals_plain_decoding(engine, k):
    """Greedy speculative decoding with penalties, logit_bias and min_tokens is token for token plain decoding."""
    params = LogitsParams(
        presence_penalty=0.3, frequency_penalty=0.4, repetition_penalty=1.3, logit_bias={5: 0.7}, min_tokens=3
    )
    prompts = _prompts()
    plain = _greedy(engine, prompts, 14, params)
    spec = _greedy(engine, prompts, 14, params, mtp=k)
    assert spec.token_ids == plain.token_ids and spec.finish_reasons == plain.finish_reasons
    assert plain.token_ids != _greedy(engine, prompts, 14).token_ids  # the processing mattered
    rate = spec.stats["mtp"]["acceptance_rate"][0]
    assert 0 < rate < 1, rate  # drafts were both accepted and rejected: the per-position histories were used


def test_seeded_sampling_with_processing_is_reproducible_and_respects_top_k(engine):
    params = LogitsParams(top_k=2, repetition_penalty=1.2, presence_penalty=0.5)
    sp = SamplingParams(10, 1.0, 1.0, 42, (EOS,), params)
    a = generate(engine.model, _prompts(), sp).token_ids
    b = generate(engine.model, _prompts(), sp).token_ids
    assert a == b
    for prompt, gen in zip(_prompts(), a, strict=True):  # every token is one of the two best of its step
        raw = engine.logits([prompt + gen])[0]
        for j, t in enumerate(gen):
            want = expected_logits(raw[len(prompt) + j - 1], prompt, gen[:j], params)
            assert want[t] >= want.topk(2).values[-1] - ARGMAX_TOL


def test_the_verifier_counts_the_drafts_before_each_position():
    """Token 3 leads token 8 by 0.5 at every position; a frequency penalty of 1 makes 3 lose once it was drafted.

    Greedy: draft 1 (a 3) is accepted, draft 2 (another 3) is rejected and 8 is the main model's token.
    A verifier that scored every position with the history alone would accept both.
    """
    from dsv3.runtime.speculative import RowSampler

    logits = torch.zeros(1, 3, VOCAB)
    logits[..., 3], logits[..., 8] = 2.0, 1.5
    row = RowLogits(LogitsParams(frequency_penalty=1.0), [0], [], VOCAB, "cpu", temperature=0.0)
    sampler = RowSampler(torch.zeros(1), torch.ones(1), [None], None, [row])
    n_acc, bonus = sampler.accept(logits, [None, None], torch.tensor([[3, 3]]))
    assert (n_acc.item(), bonus.item()) == (1, 8)
    # the drafter's second pick sees the first draft: it proposes 8, not 3
    draft, _ = sampler.pick(logits[:, 1], torch.tensor([[3]]))
    assert draft.item() == 8
