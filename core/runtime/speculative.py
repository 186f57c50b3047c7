"""Lossless speculative decoding with the Multi-Token-Prediction (MTP) module as the draft model.

One step, for every row of the batch at once (rows keep their own positions):

1. Draft ``K`` tokens with the MTP modules. Module ``l`` (``l < D``, the number of MTP layers) is
   chained as in training (``dsv3.tools.training.mtp_depth_losses``): its entry for chain start ``t``,
   at position ``t`` of its own cache, combines ``c_l[t]`` (the main model's final-normed hidden
   for ``l = 0``, else module ``l - 1``'s output at ``t``) with token ``t + l + 1`` and predicts
   token ``t + l + 2``. Drafts beyond ``D`` reuse the last module recurrently on its own output
   hidden, one position further each time (as DeepSeek's and SGLang's MTP decoding do).
2. Verify all drafts with ONE forward of the main model over ``[last token, draft_1..draft_K]``.
3. Accept the longest agreeing prefix and one more token from the main model. Greedy: a draft is
   accepted while it equals the main model's argmax. Sampling: speculative rejection sampling
   (accept with probability ``min(1, p/q)``, else resample from ``normalize(max(0, p - q))``; all
   accepted: sample from ``p``), which provably leaves the main model's distribution unchanged;
   temperature and top-p shape ``p`` and ``q`` the same way, and so does the request's logits
   processing (penalties, logit_bias, top_k, min_p, min_tokens: :mod:`dsv3.runtime.logits_processing`),
   at drafted position ``j`` with the row's tokens and drafts ``1 .. j`` as its history.

Caches are indexed by position and attention reads keys ``j <= query position``, so rolling a
row back is only moving its position: entries past it are never read and get overwritten. Each
step re-runs the MTP modules over a window of ``K + min(K, D)`` positions ending at the newest
main hidden state, so the MTP caches hold entries built from verified main hidden states and
verified tokens wherever those exist (drafts only touch entries that the next window rewrites).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import Dsv3Error
from ..model.cache import ModelCache, cache_rows
from ..model.graph import Transformer
from .generate import DecodeStep, GenerationOutput, SamplingParams, check_lengths, collect
from .logits_processing import RowLogits, process
from .sampling import finite_logits, generator_groups, nucleus

NO_MTP = "checkpoint has no MTP layers (num_nextn_predict_layers=0)"


def check_mtp(model: Transformer, k: int) -> None:
    """A clear error when ``k`` drafts cannot be made with this model (a model without MTP modules may
    say why in ``no_mtp_reason``, e.g. an exported graph that left them out)."""
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise Dsv3Error(f"mtp must be a non-negative integer (draft tokens per step); got {k!r}")
    if k and not len(model.mtp):
        raise Dsv3Error(f"{getattr(model, 'no_mtp_reason', NO_MTP)}; run without --mtp")


def processed_probs(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The distribution ``dsv3_op_sample`` draws from: logits (N, V), temperature (N,), top_p (N,) -> (N, V) fp32.

    softmax(logits / T) restricted to the top_p nucleus (the reference op's ``nucleus``: at least
    the most likely token), renormalized; a one-hot argmax for rows with temperature 0.
    """
    sorted_p, order = nucleus(logits, temperature, top_p)
    probs = torch.zeros_like(sorted_p).scatter_(-1, order, sorted_p)
    probs = probs / probs.sum(-1, keepdim=True)
    greedy = torch.zeros_like(probs).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return torch.where((temperature > 0).unsqueeze(-1), probs, greedy)


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


class RowSampler:
    """How each row of a speculative step draws its drafts and accepts them.

    temperature (B,), top_p (B,) float32; generators: one per row, a ``torch.Generator`` of its own
    (a seeded request: it draws alone, exactly as it would in a batch of one) or None (the row
    draws from ``shared`` together with the other None rows). When every row is greedy, drafts are
    argmaxes and are accepted while they equal the main model's argmax; otherwise every row goes
    through rejection sampling (a temperature-0 row has one-hot p and q there, which accepts
    exactly the argmax-equal drafts and adds the argmax).

    rows: each row's logits processing (:mod:`dsv3.runtime.logits_processing`; None, or a None
    entry: none), applied alike to the drafter's logits and to the verifier's at every drafted
    position, each with the history it follows (the row's tokens, then the drafts before that
    position), so p and q are what plain decoding would process and the output stays exact.
    """

    def __init__(
        self,
        temperature: torch.Tensor,
        top_p: torch.Tensor,
        generators: list[torch.Generator | None],
        shared: torch.Generator | None,
        rows: list[RowLogits | None] | None = None,
    ):
        self.temperature, self.top_p = temperature, top_p
        self.greedy = bool((temperature == 0).all())
        self._groups = generator_groups(generators, shared, temperature.device)
        self.rows = rows if rows is not None and any(r is not None for r in rows) else None

    @property
    def processes(self) -> bool:
        """Whether some row's logits are processed (then ``pick`` needs the drafts before each one)."""
        return self.rows is not None

    def pick(self, logits: torch.Tensor, prior: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """logits (B, V), prior (B, j) int64 (this step's earlier drafts, when ``processes``) -> drafts (B,)
        int64 and the draft distributions q (B, V) (None when greedy)."""
        logits = process(logits, self.rows, self.temperature, prior)[1]
        if self.greedy:  # a bad draft is only rejected by the verify step (whose logits are checked)
            return logits.argmax(-1), None
        q = processed_probs(finite_logits(logits, "MTP module's logits"), self.temperature, self.top_p)
        drafts = torch.empty(q.shape[0], dtype=torch.long, device=q.device)
        for idx, g in self._groups:
            drafts[idx] = torch.multinomial(q[idx], 1, generator=g).squeeze(-1)
        return drafts, q

    def accept(
        self, logits: torch.Tensor, qs: list[torch.Tensor | None], drafts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """logits (B, K+1, V), qs K x (B, V), drafts (B, K) -> accepted drafts (B,) and the next token (B,)."""
        logits = process(logits, self.rows, self.temperature, drafts)[1]  # position j after drafts[:, :j]
        rows = torch.arange(drafts.shape[0], device=drafts.device)
        if self.greedy:
            target = logits.argmax(-1)  # (B, K+1)
            n_acc = (drafts == target[:, : drafts.shape[1]]).long().cumprod(-1).sum(-1)  # (B,)
            return n_acc, target[rows, n_acc]
        q = torch.stack(qs, 1)  # (B, K, V)
        n_acc, bonus = torch.empty_like(rows), torch.empty_like(rows)
        for idx, g in self._groups:
            n_acc[idx], bonus[idx] = _accept_sampled(
                logits[idx], q[idx], drafts[idx], self.temperature[idx], self.top_p[idx], g
            )
        return n_acc, bonus


class SpecDecoder:
    """Speculative decoding over the rows (slots) of one cache: each slot's tokens and recent main hidden states.

    ``prefill`` runs prompts into their slots (the main model, then the MTP modules over every
    prompt position whose tokens are known); ``put`` records a sampled token; ``step`` drafts K
    tokens for some slots, verifies them with one main-model forward and accepts a prefix (the
    caller moves each slot's position on by ``n_acc + 1``). Slots are independent: any subset
    steps together, at its own positions, so requests can join and leave between steps, and a
    step's MTP window is the same ``K + min(K, D)`` positions for every slot.
    The cache must hold ``K + 1`` positions past the last token a slot may generate.

    Main hidden states are only read inside a step's window, so each slot keeps the last
    ``window + K`` of them in a ring indexed by ``position % ring``. That holds while each slot's
    position moves forward between its steps (a slot stepped again at the same position, such as
    a finished row that generate_speculative keeps in its batch, reads overwritten entries; its
    output is discarded).
    """

    def __init__(self, model: Transformer, cache: ModelCache, k: int):
        check_mtp(model, k)
        if k == 0:
            raise Dsv3Error("speculative decoding needs mtp >= 1 draft token")
        self.model, self.cache, self.k = model, cache, k
        device = model.embed.device
        b, size = cache.max_batch, cache.max_len
        self.tokens = torch.zeros(b, size + k + 2, dtype=torch.long, device=device)  # (slots, S + K + 2)
        self.cap = min(model.cfg.max_position_embeddings, size) - 1  # positions past a budget clamp here
        self.n_layers = min(k, len(model.mtp))  # MTP modules chained per draft; the rest reuse the last
        self.window = k + self.n_layers  # MTP positions recomputed per step
        # a step reads hidden states from pos - window on and writes up to pos + K: window + K apart
        self.ring = self.window + k
        self.hidden = torch.zeros(b, self.ring, model.cfg.hidden_size, dtype=model.embed.dtype, device=device)
        self.offsets = torch.arange(k + 1, device=device)

    def _slots(self, slots: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(slot index tensor, cache rows for forward: None when the slots are 0..B-1)."""
        return torch.tensor(slots, dtype=torch.long, device=self.tokens.device), cache_rows(slots, self.tokens.device)

    def prefill(
        self, slots: list[int], prompts: list[list[int]], start: int = 0, stop: int | None = None
    ) -> torch.Tensor | None:
        """Run prompts (right-padded) into ``slots``, positions ``start .. stop - 1`` (default: to the end).

        Returns the logits (B, V) at each prompt's last token once ``stop`` reaches the longest
        prompt, else None (a chunk of a longer prefill: call again from ``stop``). Every row must
        have more than ``start`` tokens.
        """
        sl, rows = self._slots(slots)
        device = sl.device
        lens = torch.tensor([len(p) for p in prompts], device=device)
        width = int(lens.max())
        stop = width if stop is None else stop
        for s, p in zip(slots, prompts, strict=True):  # this chunk's tokens and those its MTP chain reads
            upto = min(len(p), stop + self.n_layers)
            self.tokens[s, start:upto] = torch.tensor(p[start:upto], device=device)
        positions = torch.arange(start, stop, device=device).expand(len(slots), stop - start)
        hidden = self.model(self.tokens[sl, start:stop], positions, self.cache, rows=rows)  # (B, T, D)
        batch = torch.arange(len(slots), device=device).unsqueeze(1)  # (B, 1)
        # each row's last `ring` positions in this chunk (short rows repeat their first: same value, same slot)
        end = lens.clamp(max=stop).unsqueeze(1)
        recent = (end - self.ring + torch.arange(self.ring, device=device)).clamp(min=start)
        self.hidden[sl.unsqueeze(1), recent % self.ring] = hidden[batch, recent - start]
        self._prefill_mtp(sl, rows, hidden, lens, start, stop)
        if stop < width:
            return None
        return finite_logits(self.model.logits(hidden[batch.squeeze(1), lens - 1 - start]))

    def _prefill_mtp(
        self,
        sl: torch.Tensor,
        rows: torch.Tensor | None,
        hidden: torch.Tensor,
        lens: torch.Tensor,
        start: int,
        stop: int,
    ) -> None:
        """MTP cache entries of every module for the chunk's chain starts t <= len - 1 - n_layers (tokens known).

        hidden (B, stop - start, D): the main model's hidden states at positions start .. stop - 1.
        The first step's window (the last ``window`` positions) recomputes the rest, once the first
        sampled token is known. Rows with fewer positions repeat their last one (the same entry again).
        """
        last = torch.minimum(lens - 1 - self.n_layers, torch.full_like(lens, stop - 1))  # (B,) last t of the chain
        span = int(last.max()) + 1 - start
        if span <= 0:
            return
        t = (start + torch.arange(span, device=lens.device)).unsqueeze(0).minimum(last.clamp(min=start).unsqueeze(1))
        c = hidden[torch.arange(len(lens), device=lens.device).unsqueeze(1), t - start]  # (B, span, D)
        for layer in range(self.n_layers):
            tok = self.tokens[sl.unsqueeze(1), t + layer + 1]  # (B, span)
            c = self.model.mtp_forward(layer, c, tok, t, self.cache, rows)

    def put(self, slots: list[int], positions: torch.Tensor, tokens: torch.Tensor) -> None:
        """Record ``tokens (B,)`` at ``positions (B,)`` of ``slots`` (e.g. the first sampled token)."""
        self.tokens[self._slots(slots)[0], positions] = tokens

    def step(
        self, slots: list[int], pos: torch.Tensor, sampler: RowSampler
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One draft-verify-accept step for ``slots`` whose newest token (unseen by the main model) is at pos (B,).

        Returns accepted draft counts (B,), the main model's next token (B,) and the drafts (B, K);
        the accepted drafts and that token are recorded at positions ``pos + 1 .. pos + n_acc + 1``.
        """
        sl, rows = self._slots(slots)
        window = (pos.unsqueeze(1) - self.window + torch.arange(self.window, device=pos.device)).clamp(min=0)
        qs = self._draft(sl, rows, window, pos, sampler)  # window (B, W): positions pos - W .. pos - 1
        ver_pos = pos.unsqueeze(1) + self.offsets  # (B, K+1)
        ver_tok = self.tokens[sl.unsqueeze(1), ver_pos]  # (B, K+1): newest token, then the drafts
        ver_pos = ver_pos.clamp(max=self.cap)
        h = self.model(ver_tok, ver_pos, self.cache, rows=rows)  # (B, K+1, D)
        self.hidden[sl.unsqueeze(1), ver_pos % self.ring] = h
        drafts = ver_tok[:, 1:]  # (B, K)
        n_acc, bonus = sampler.accept(finite_logits(self.model.logits(h)), qs, drafts)
        self.tokens[sl, pos + n_acc + 1] = bonus
        return n_acc, bonus, drafts

    def _prior(self, sl: torch.Tensor, pos: torch.Tensor, j: int, sampler: RowSampler) -> torch.Tensor | None:
        """This step's first j drafts (B, j) (at pos + 1 .. pos + j), when the sampler processes logits."""
        if not sampler.processes:
            return None
        return self.tokens[sl.unsqueeze(1), pos.unsqueeze(1) + self.offsets[1 : j + 1]]

    def _draft(
        self, sl: torch.Tensor, rows: torch.Tensor | None, window: torch.Tensor, pos: torch.Tensor, sampler
    ) -> list[torch.Tensor | None]:
        """Write K drafts into ``tokens[sl, pos + 1 .. pos + K]``; return their draft distributions q (B, V) each.

        window (B, W): positions t (ascending, last = pos - 1) whose MTP entries are (re)computed.
        """
        model, cache, cap, k, n_layers = self.model, self.cache, self.cap, self.k, self.n_layers
        col = sl.unsqueeze(1)  # (B, 1)
        c = self.hidden[col, window % self.ring]  # (B, W, D): c_0[t], the main model's hidden states
        qs = []
        for layer in range(n_layers):
            tok = self.tokens[col, window + layer + 1]  # (B, W): token t + l + 1 (verified, or this step's drafts)
            c = model.mtp_forward(layer, c, tok, window.clamp(max=cap), cache, rows)  # (B, W, D)
            draft, q = sampler.pick(model.mtp[layer].logits(c[:, -1]), self._prior(sl, pos, layer, sampler))
            self.tokens[sl, pos + layer + 1] = draft
            qs.append(q)
        g = c[:, -1:]  # (B, 1, D)
        last = n_layers - 1
        for j in range(n_layers, k):  # recurrent reuse of the last module, one position further each time
            tok = self.tokens[sl, pos + j].unsqueeze(1)  # (B, 1)
            g = model.mtp_forward(last, g, tok, (pos + j - 1 - last).clamp(max=cap).unsqueeze(1), cache, rows)
            draft, q = sampler.pick(model.mtp[last].logits(g[:, 0]), self._prior(sl, pos, j, sampler))
            self.tokens[sl, pos + j + 1] = draft
            qs.append(q)
        return qs


def speculative_steps(
    model: Transformer, prompts: list[list[int]], params: SamplingParams, k: int
) -> Iterator[DecodeStep]:
    """:func:`generate_speculative` one step at a time: the first sampled token of every row, then each
    draft-verify step's accepted drafts and the main model's token (cut at EOS and at the budget).

    Bad prompts or parameters raise here, at the call. The last step carries the finish reasons and
    the stats of :func:`generate_speculative`.
    """
    check_mtp(model, k)
    if k == 0:
        raise Dsv3Error("speculative decoding needs mtp >= 1 draft token")
    start = time.perf_counter()
    total = check_lengths(model, prompts, params.validate(model.cfg.vocab_size).max_new_tokens)
    return _speculate(model, prompts, params, k, total, start)


@torch.inference_mode()
def _speculate(
    model: Transformer, prompts: list[list[int]], params: SamplingParams, k: int, total: int, start: float
) -> Iterator[DecodeStep]:
    device = model.embed.device
    b = len(prompts)
    spec = SpecDecoder(model, model.new_cache(b, total + k + 1), k)
    seed, par = params.seed, getattr(model.opts, "parallel", None)
    if par is not None:  # tensor parallel: every rank must draw the same tokens
        from .distributed import agree_on_seed

        seed = agree_on_seed(par, seed, params.temperature)
    generator = None if seed is None else torch.Generator(device=device).manual_seed(seed)
    temperature = torch.full((b,), float(params.temperature), device=device)
    top_p = torch.full((b,), float(params.top_p), device=device)
    rows = [params.row_logits(p, model.cfg.vocab_size, device) for p in prompts]
    sampler = RowSampler(temperature, top_p, [None] * b, generator, rows)
    eos = set(params.stop_ids)
    slots = list(range(b))

    logits = spec.prefill(slots, prompts)  # every prompt at once, right-padded
    first = model.ops.sample(process(logits, sampler.rows, temperature)[1], temperature, top_p, generator)  # (B,)
    pos = torch.tensor([len(p) for p in prompts], device=device)  # each row's newest token, unseen by the model
    spec.put(slots, pos, first)
    new = [[int(t)] for t in first.tolist()]
    for r, t in zip(rows, new, strict=True):
        if r is not None:
            r.extend(t)
    counts = [1] * b  # tokens generated per row
    last = [o[-1] for o in new]
    first_at = time.perf_counter()
    done = [t in eos or params.max_new_tokens == 1 for t in last]
    stats = [RowStats(k, accepted=[0] * k) for _ in range(b)]

    while not all(done):
        yield DecodeStep(new)
        n_acc, bonus, drafts = spec.step(slots, pos, sampler)
        new = [[] for _ in range(b)]
        for i in range(b):
            if done[i]:
                continue
            a = int(n_acc[i])
            s = stats[i]
            s.steps += 1
            s.verified_tokens += a + 1
            for j in range(a):
                s.accepted[j] += 1
            accepted = drafts[i, :a].tolist() + [int(bonus[i])]
            for t in accepted[: params.max_new_tokens - counts[i]]:
                new[i].append(t)
                if t in eos:
                    done[i] = True
                    break
            counts[i] += len(new[i])
            if rows[i] is not None:
                rows[i].extend(new[i])
            last[i] = new[i][-1]
            if counts[i] >= params.max_new_tokens:
                done[i] = True
            if not done[i]:
                pos[i] += a + 1
    elapsed = time.perf_counter() - start
    n_tokens = sum(counts)
    rows = [s.as_dict(n_tokens / max(elapsed, 1e-9)) for s in stats]
    reasons = ["stop" if t in eos else "length" for t in last]
    timing = {"ttft_s": first_at - start, "decode_s": elapsed - (first_at - start)}
    stats_out = {"mtp": summarize(rows, n_tokens, elapsed), "mtp_rows": rows, **timing}
    yield DecodeStep(new, reasons, stats_out)


def generate_speculative(
    model: Transformer, prompts: list[list[int]], params: SamplingParams, k: int
) -> GenerationOutput:
    """Generate like :func:`dsv3.runtime.generate.generate`, drafting ``k`` tokens per main-model forward with MTP.

    Greedy output is token-for-token that of plain generation; sampled output has the same
    distribution. ``stats["mtp"]`` holds the batch summary and ``stats["mtp_rows"]`` one dict per row;
    ``stats["ttft_s"]`` / ``stats["decode_s"]``: call to first token and first token to the end (wall clock).
    """
    return collect(speculative_steps(model, prompts, params, k), len(prompts))


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
