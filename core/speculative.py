"""Lossless speculative decoding with the Multi-Token-Prediction (MTP) module as the draft model.

One step, for every row of the batch at once (rows keep their own positions):

1. Draft ``K`` tokens with the MTP modules. Module ``l`` (``l < D``, the number of MTP layers) is
   chained as in training: its entry at position ``t + l`` combines ``c_l[t]`` (the main model's
   final-normed hidden for ``l = 0``, else module ``l - 1``'s output at ``t``) with token
   ``t + l + 1``. Drafts beyond ``D`` reuse the last module recurrently on its own output hidden,
   one position further each time (as DeepSeek's and SGLang's MTP decoding do).
2. Verify all drafts with ONE forward of the main model over ``[last token, draft_1..draft_K]``.
3. Accept the longest agreeing prefix and one more token from the main model. Greedy: a draft is
   accepted while it equals the main model's argmax. Sampling: speculative rejection sampling
   (accept with probability ``min(1, p/q)``, else resample from ``normalize(max(0, p - q))``; all
   accepted: sample from ``p``), which provably leaves the main model's distribution unchanged;
   temperature and top-p shape ``p`` and ``q`` the same way.

Caches are indexed by position and attention reads keys ``j <= query position``, so rolling a
row back is only moving its position: entries past it are never read and get overwritten. Each
step re-runs the MTP modules over a window of ``K + min(K, D)`` positions ending at the newest
main hidden state, so the MTP caches hold entries built from verified main hidden states and
verified tokens wherever those exist (drafts only touch entries that the next window rewrites).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from .errors import Dsv3Error
from .generate import GenerationOutput, SamplingParams, check_lengths
from .model import ModelCache, Transformer

NO_MTP = "checkpoint has no MTP layers (num_nextn_predict_layers=0)"


def check_mtp(model: Transformer, k: int) -> None:
    """A clear error when ``k`` drafts cannot be made with this model."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise Dsv3Error(f"mtp must be a non-negative integer (draft tokens per step); got {k!r}")
    if k and not len(model.mtp):
        raise Dsv3Error(f"{NO_MTP}; run without --mtp")


def processed_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The distribution ``dsv3_op_sample`` draws from: logits (N, V), temperature (N,), top_p (N,) -> (N, V) fp32.

    softmax(logits / T) restricted to the smallest set of most likely tokens whose mass reaches
    top_p, renormalized; a one-hot argmax for rows with temperature 0.
    """
    logits = logits.float()
    hot = temperature > 0
    t = torch.where(hot, temperature, torch.ones_like(temperature)).unsqueeze(-1)
    probs = torch.softmax(logits / t, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_p.cumsum(-1) - sorted_p
    sorted_p = sorted_p.masked_fill(mass_before >= top_p.unsqueeze(-1), 0.0)
    probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
    probs = probs / probs.sum(-1, keepdim=True)
    greedy = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where(hot.unsqueeze(-1), probs, greedy)


@dataclass
class RowStats:
    """One row's speculative-decoding counters (main-model verify steps while the row was active)."""

    k: int
    steps: int = 0
    accepted: list[int] = field(default_factory=list)  # steps whose draft i was accepted, per position i
    verified_tokens: int = 0  # accepted drafts + the main model's own token, summed over steps

    def as_dict(self, tokens_per_s: float) -> dict:
        return {
            "k": self.k,
            "steps": self.steps,
            "accepted": list(self.accepted),
            "acceptance_rate": [round(a / self.steps, 4) if self.steps else 0.0 for a in self.accepted],
            "tokens_per_forward": round(self.verified_tokens / self.steps, 4) if self.steps else 0.0,
            "tokens_per_s": round(tokens_per_s, 2),
        }


def summarize(rows: list[dict], tokens: int, elapsed: float) -> dict:
    """Batch totals from per-row stats (``RowStats.as_dict``): per-position acceptance, tokens/forward, tokens/s."""
    k = rows[0]["k"]
    steps = sum(r["steps"] for r in rows)
    accepted = [sum(r["accepted"][i] for r in rows) for i in range(k)]
    verified = sum(r["tokens_per_forward"] * r["steps"] for r in rows)
    return {
        "k": k,
        "steps": steps,
        "accepted": accepted,
        "acceptance_rate": [round(a / steps, 4) if steps else 0.0 for a in accepted],
        "tokens_per_forward": round(verified / steps, 4) if steps else 0.0,
        "tokens": tokens,
        "elapsed_s": round(elapsed, 4),
        "tokens_per_s": round(tokens / max(elapsed, 1e-9), 2),
    }


def summary_line(s: dict) -> str:
    """One human-readable line for stderr."""
    rates = ", ".join(f"{r:.2f}" for r in s["acceptance_rate"])
    return (
        f"dsv3: mtp k={s['k']}: acceptance per draft position [{rates}], "
        f"{s['tokens_per_forward']:.2f} tokens per main-model forward, {s['tokens_per_s']:.1f} tokens/s"
    )


class _State:
    """Per-row buffers: the token and the main model's hidden state at every position."""

    def __init__(self, model: Transformer, b: int, size: int, k: int):
        device = model.embed.device
        self.rows = torch.arange(b, device=device)
        self.tokens = torch.zeros(b, size + k + 2, dtype=torch.long, device=device)  # (B, S + K + 2)
        self.hidden = torch.zeros(b, size, model.cfg.hidden_size, dtype=model.embed.dtype, device=device)  # (B, S, D)


def _draft(
    model: Transformer,
    cache: ModelCache,
    st: _State,
    window: torch.Tensor,
    pos: torch.Tensor,
    k: int,
    cap: int,
    pick,
) -> list[torch.Tensor]:
    """Write K drafts into ``st.tokens[:, pos + 1 .. pos + K]``; return their draft distributions q (B, V) each.

    window (B, W): positions t (ascending, last = pos - 1) whose MTP entries are (re)computed;
    pos (B,): each row's newest verified token position.
    """
    rows = st.rows.unsqueeze(1)  # (B, 1)
    n_layers = min(k, len(model.mtp))
    c = st.hidden[rows, window]  # (B, W, D): c_0[t], the main model's hidden states
    qs = []
    for layer in range(n_layers):
        tok = st.tokens[rows, window + layer + 1]  # (B, W): token t + l + 1 (verified, or this step's drafts)
        c = model.mtp_forward(layer, c, tok, (window + layer).clamp(max=cap), cache)  # (B, W, D)
        draft, q = pick(model.mtp[layer].logits(c[:, -1]))
        st.tokens[st.rows, pos + layer + 1] = draft
        qs.append(q)
    g = c[:, -1:]  # (B, 1, D)
    last = n_layers - 1
    for j in range(n_layers, k):  # recurrent reuse of the last module, one position further each time
        tok = st.tokens[st.rows, pos + j].unsqueeze(1)  # (B, 1)
        g = model.mtp_forward(last, g, tok, (pos + j - 1).clamp(max=cap).unsqueeze(1), cache)
        draft, q = pick(model.mtp[last].logits(g[:, 0]))
        st.tokens[st.rows, pos + j + 1] = draft
        qs.append(q)
    return qs


@torch.inference_mode()
def generate_speculative(
    model: Transformer, prompts: list[list[int]], params: SamplingParams, k: int
) -> GenerationOutput:
    """Generate like :func:`dsv3.generate.generate`, drafting ``k`` tokens per main-model forward with MTP.

    Greedy output is token-for-token that of plain generation; sampled output has the same
    distribution. ``stats["mtp"]`` holds the batch summary and ``stats["mtp_rows"]`` one dict per row;
    ``stats["ttft_s"]`` / ``stats["decode_s"]``: call to first token and first token to the end (wall clock).
    """
    check_mtp(model, k)
    if k == 0:
        raise Dsv3Error("speculative decoding needs mtp >= 1 draft token")
    start = time.perf_counter()
    total = check_lengths(model, prompts, params.max_new_tokens)
    device = model.embed.device
    b = len(prompts)
    size = total + k + 1
    cap = min(model.cfg.max_position_embeddings, size) - 1  # positions past a row's budget are clamped here
    cache = model.new_cache(b, size)
    st = _State(model, b, size, k)
    seed, par = params.seed, getattr(model.opts, "parallel", None)
    if par is not None:  # tensor parallel: every rank must draw the same tokens
        from .parallel import agree_on_seed

        seed = agree_on_seed(par, seed, params.temperature)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    temperature = torch.full((b,), float(params.temperature), device=device)
    top_p = torch.full((b,), float(params.top_p), device=device)
    greedy = params.temperature == 0
    eos = set(params.eos_ids)

    def pick(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if greedy:
            return logits.argmax(-1), None
        q = processed_probs(logits, temperature, top_p)
        return torch.multinomial(q, 1, generator=generator).squeeze(-1), q

    # prefill: every prompt at once, right-padded
    lens = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lens.max())
    for i, p in enumerate(prompts):
        st.tokens[i, : len(p)] = torch.tensor(p, device=device)
    hidden = model(st.tokens[:, :width], torch.arange(width, device=device).expand(b, width), cache)  # (B, W, D)
    st.hidden[:, :width] = hidden
    first = model.ops.sample(model.logits(hidden[st.rows, lens - 1]), temperature, top_p, generator)  # (B,)
    st.tokens[st.rows, lens] = first
    out = [[int(t)] for t in first.tolist()]
    first_at = time.perf_counter()
    done = [o[-1] in eos or params.max_new_tokens == 1 for o in out]
    pos = lens.clone()  # position of each row's newest token, not yet seen by the main model
    stats = [RowStats(k, accepted=[0] * k) for _ in range(b)]

    w = k + min(k, len(model.mtp))
    offsets = torch.arange(k + 1, device=device)
    first_step = True
    while not all(done):
        # the first window covers the whole prompt, later ones the last w positions
        span = max(width, w) if first_step else w
        first_step = False
        window = (pos.unsqueeze(1) - span + torch.arange(span, device=device)).clamp(min=0)  # (B, span)
        qs = _draft(model, cache, st, window, pos, k, cap, pick)

        ver_pos = pos.unsqueeze(1) + offsets  # (B, K+1)
        ver_tok = st.tokens[st.rows.unsqueeze(1), ver_pos]  # (B, K+1): newest token, then the drafts
        ver_pos = ver_pos.clamp(max=cap)
        h = model(ver_tok, ver_pos, cache)  # (B, K+1, D)
        st.hidden[st.rows.unsqueeze(1), ver_pos] = h
        logits = model.logits(h)  # (B, K+1, V) float32
        drafts = ver_tok[:, 1:]  # (B, K)
        if greedy:
            target = logits.argmax(-1)  # (B, K+1)
            n_acc = (drafts == target[:, :k]).long().cumprod(-1).sum(-1)  # (B,)
            bonus = target[st.rows, n_acc]
        else:
            n_acc, bonus = _accept_sampled(logits, torch.stack(qs, 1), drafts, temperature, top_p, generator)
        st.tokens[st.rows, pos + n_acc + 1] = bonus

        for i in range(b):
            if done[i]:
                continue
            a = int(n_acc[i])
            s = stats[i]
            s.steps += 1
            s.verified_tokens += a + 1
            for j in range(a):
                s.accepted[j] += 1
            new = drafts[i, :a].tolist() + [int(bonus[i])]
            new = new[: params.max_new_tokens - len(out[i])]
            for t in new:
                out[i].append(t)
                if t in eos:
                    done[i] = True
                    break
            if len(out[i]) >= params.max_new_tokens:
                done[i] = True
            if not done[i]:
                pos[i] += a + 1
    elapsed = time.perf_counter() - start
    n_tokens = sum(len(o) for o in out)
    rows = [s.as_dict(n_tokens / max(elapsed, 1e-9)) for s in stats]
    reasons = ["stop" if o and o[-1] in eos else "length" for o in out]
    timing = {"ttft_s": first_at - start, "decode_s": elapsed - (first_at - start)}
    return GenerationOutput(out, reasons, {"mtp": summarize(rows, n_tokens, elapsed), "mtp_rows": rows, **timing})


def _accept_sampled(
    logits: torch.Tensor,
    q: torch.Tensor,
    drafts: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rejection sampling: logits (B, K+1, V), q (B, K, V), drafts (B, K) -> accepted count (B,), next token (B,)."""
    b, k1, v = logits.shape
    k = k1 - 1
    p = processed_probs(logits.reshape(b * k1, v), temperature.repeat_interleave(k1), top_p.repeat_interleave(k1))
    p = p.view(b, k1, v)
    px = p[:, :k].gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, K)
    qx = q.gather(-1, drafts.unsqueeze(-1)).squeeze(-1)  # (B, K), > 0: the drafts were drawn from q
    u = torch.rand(b, k, generator=generator, device=logits.device)
    n_acc = (u * qx < px).long().cumprod(-1).sum(-1)  # (B,)
    rows = torch.arange(b, device=logits.device)
    p_next = p[rows, n_acc]  # (B, V): the main model's distribution after the accepted prefix
    q_next = torch.cat([q, torch.zeros_like(q[:, :1])], 1)[rows, n_acc]  # zeros when every draft was accepted
    residual = (p_next - q_next).clamp(min=0)
    mass = residual.sum(-1, keepdim=True)
    dist = torch.where(mass > 0, residual / mass.clamp(min=1e-30), p_next)
    return n_acc, torch.multinomial(dist, 1, generator=generator).squeeze(-1)
