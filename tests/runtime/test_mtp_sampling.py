"""Sampling with MTP speculative decoding draws from the main model's distribution (chi-square tests).

A tiny vocab-16 model, trained for a few steps so its MTP drafts are right often but not always,
samples the first tokens of one prompt in N rows at once. The counts of each outcome are tested
against the exact probabilities (products of the main model's conditionals, computed without a
cache and with an independent temperature/top-p implementation) by Pearson's chi-square at
significance 0.001: a correct sampler fails once in a thousand seeds; the seeds are fixed.
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import product

import pytest
import torch

import dsv3
from dsv3.runtime.generate import SamplingParams, generate
from dsv3.runtime.logits_processing import LogitsParams
from dsv3.runtime.speculative import generate_speculative
from tests.helpers import make_checkpoint, train_on_patterns

VOCAB = 16
N = 12000
ALPHA_Z = 3.0902  # standard normal quantile of 1 - 0.001
PROMPT = [0, 3, 11]  # two tokens of an unknown progression: the model spreads its bets


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = make_checkpoint(tmp_path_factory.mktemp("mtp_sampling") / "ckpt", seed=3, mtp=True, vocab_size=VOCAB)
    m = dsv3.load(path, dtype="float32").model
    train_on_patterns(m, steps=60, seed=0)
    return m


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(..., V) logits -> probabilities: softmax(logits / T) over the smallest top set reaching top_p."""
    probs = torch.softmax(logits.double() / temperature, -1)
    out = torch.zeros_like(probs)
    for idx in product(*(range(s) for s in probs.shape[:-1])):
        row = probs[idx]
        order = row.argsort(descending=True)
        kept, mass = [], 0.0
        for tok in order.tolist():
            kept.append(tok)
            mass += float(row[tok])
            if mass >= top_p:
                break
        out[idx][kept] = row[kept] / row[kept].sum()
    return out


@torch.no_grad()
def _exact(model, n_tokens: int, temperature: float, top_p: float) -> dict[tuple[int, ...], float]:
    """Exact probability of every sequence of the first n_tokens (2 or 3) after PROMPT."""
    conts = torch.tensor(list(product(range(VOCAB), repeat=n_tokens - 1)))  # (V^(n-1), n-1)
    seqs = torch.cat([torch.tensor(PROMPT).expand(len(conts), -1), conts], 1)
    probs = _nucleus(model.logits(model(seqs))[:, len(PROMPT) - 1 :], temperature, top_p)  # (V^(n-1), n, V)
    joint = {}
    for row, cont in enumerate(conts.tolist()):
        prefix = 1.0
        for i, tok in enumerate(cont):
            prefix *= float(probs[row, i, tok])
        for last in range(VOCAB):
            joint[(*cont, last)] = prefix * float(probs[row, n_tokens - 1, last])
    return joint


def _chi_square(counts: Counter, expected: dict[tuple[int, ...], float], n: int) -> tuple[float, float]:
    """Pearson's statistic (cells expecting < 5 draws pooled into one) and its 0.001 critical value."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for outcome, p in expected.items():
        e = n * p
        if e >= 5:
            stat += (counts.get(outcome, 0) - e) ** 2 / e
            cells += 1
        else:
            pooled_obs += counts.get(outcome, 0)
            pooled_exp += e
    if pooled_exp > 0:
        stat += (pooled_obs - pooled_exp) ** 2 / pooled_exp
        cells += 1
    df = cells - 1
    # Wilson-Hilferty approximation of the chi-square quantile (relative error < 1e-3 for df >= 10)
    critical = df * (1 - 2 / (9 * df) + ALPHA_Z * math.sqrt(2 / (9 * df))) ** 3
    return stat, critical


@pytest.mark.parametrize(
    ("k", "n_tokens", "temperature", "top_p"),
    [(1, 2, 1.0, 1.0), (2, 3, 1.5, 1.0), (3, 3, 2.0, 0.9)],
)
def test_mtp_sampling_keeps_the_main_distribution(model, k, n_tokens, temperature, top_p):
    params = SamplingParams(n_tokens, temperature, top_p, seed=1234 + k, eos_ids=())
    out = generate_speculative(model, [PROMPT] * N, params, k)
    expected = _exact(model, n_tokens, temperature, top_p)
    assert abs(sum(expected.values()) - 1) < 1e-9
    stat, critical = _chi_square(Counter(tuple(t) for t in out.token_ids), expected, N)
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f} (alpha 0.001)"
    # the verifier really decided: drafts were both accepted and rejected
    rate = out.stats["mtp"]["acceptance_rate"][0]
    assert 0.05 < rate < 0.95, rate


def test_chi_square_detects_sampling_the_drafts_unchecked(model):
    """Power check: taking the MTP's draft for token 2 without verification fails the same test."""
    temperature, top_p = 1.0, 1.0
    expected = _exact(model, 2, temperature, top_p)
    with torch.no_grad():
        seqs = torch.cat([torch.tensor(PROMPT).expand(VOCAB, -1), torch.arange(VOCAB).unsqueeze(1)], 1)  # (V, L+1)
        h = model(seqs[:, :-1])  # (V, L, D)
        pos = torch.arange(len(PROMPT)).expand(VOCAB, -1)
        g = model.mtp_forward(0, h, seqs[:, 1:], pos)  # (V, L, D): position L-1 predicts token 2
        q = _nucleus(model.mtp[0].logits(g[:, -1]), temperature, top_p)  # (V, V): q[x1, x2]
        p1 = _nucleus(model.logits(h[0, -1]), temperature, top_p)  # (V,)
    gen = torch.Generator().manual_seed(5)
    x1 = torch.multinomial(p1.float(), N, replacement=True, generator=gen)
    x2 = torch.multinomial(q.float()[x1], 1, generator=gen).squeeze(1)
    stat, critical = _chi_square(Counter(zip(x1.tolist(), x2.tolist(), strict=True)), expected, N)
    assert stat > critical, f"chi-square {stat:.1f} <= {critical:.1f}: the test cannot see the difference"


def test_plain_sampling_passes_the_same_test(model):
    """Control: the exact probabilities match what plain generation (the sample operator) draws."""
    out = generate(model, [PROMPT] * N, SamplingParams(2, 1.0, 1.0, seed=99, eos_ids=()))
    stat, critical = _chi_square(Counter(tuple(t) for t in out.token_ids), _exact(model, 2, 1.0, 1.0), N)
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f} (alpha 0.001)"


# --------------------------------------------------------------- with logits processing
PROCESSING = LogitsParams(
    presence_penalty=0.5, frequency_penalty=0.8, repetition_penalty=1.5, logit_bias={7: 1.0}, top_k=6, min_p=0.02,
    min_tokens=2,
)  # fmt: skip
STOP = 5  # held back by min_tokens for the first two tokens; the third may be it (ending there changes nothing)


@torch.no_grad()
def _exact_processed(model, temperature: float, top_p: float) -> dict[tuple[int, ...], float]:
    """Exact probability of every 3-token continuation under PROCESSING, each conditional processed by hand
    (test_logits_processing's expected_logits / expected_kept) with the tokens before it as history."""
    from tests.runtime.test_logits_processing import expected_kept, expected_logits

    conts = torch.tensor(list(product(range(VOCAB), repeat=2)))  # (V^2, 2)
    seqs = torch.cat([torch.tensor(PROMPT).expand(len(conts), -1), conts], 1)
    raw = model.logits(model(seqs))[:, len(PROMPT) - 1 :]  # (V^2, 3, V)

    def dist(row: int, i: int, history: list[int]) -> torch.Tensor:
        x = expected_logits(raw[row, i], PROMPT, history, PROCESSING, [STOP])
        kept = expected_kept(x, PROCESSING, temperature)
        x = torch.where(torch.isin(torch.arange(VOCAB), torch.tensor(sorted(kept))), x, -math.inf)
        return _nucleus(x, temperature, top_p)

    joint = {}
    for row, cont in enumerate(conts.tolist()):
        prefix = float(dist(row, 0, [])[cont[0]]) * float(dist(row, 1, cont[:1])[cont[1]])
        if prefix > 0:
            last = dist(row, 2, cont)
            for t in range(VOCAB):
                joint[(*cont, t)] = prefix * float(last[t])
    return joint


@pytest.mark.parametrize("k", [0, 2])  # 0: plain generation, the control for the hand computation
def test_sampling_with_logits_processing_keeps_the_processed_distribution(model, k):
    """Speculative decoding stays lossless with penalties, logit_bias, top_k, min_p and min_tokens: the verifier
    and the drafter process every drafted position with the drafts before it."""
    temperature, top_p = 1.5, 0.95
    params = SamplingParams(3, temperature, top_p, seed=77 + k, eos_ids=(STOP,), logits=PROCESSING)
    out = generate_speculative(model, [PROMPT] * N, params, k) if k else generate(model, [PROMPT] * N, params)
    expected = _exact_processed(model, temperature, top_p)
    assert abs(sum(expected.values()) - 1) < 1e-9
    stat, critical = _chi_square(Counter(tuple(t) for t in out.token_ids), expected, N)
    assert stat < critical, f"chi-square {stat:.1f} >= {critical:.1f} (alpha 0.001)"
    if k:
        rate = out.stats["mtp"]["acceptance_rate"][0]
        assert 0.05 < rate < 0.95, rate
