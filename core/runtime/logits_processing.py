"""The logits-processing stage that plain, speculative (MTP) and served decoding all use: plain PyTorch.

Per sequence (each request its own :class:`LogitsParams`), in this order, on the model's float32
logits before temperature and top-p (the order vLLM's sampler uses):

1. ``logit_bias``: ``{token id: bias}`` added to the logits;
2. ``min_tokens``: the sequence's stop ids (EOS and ``stop_token_ids``) at -inf until that many
   tokens were generated;
3. ``repetition_penalty`` r (Hugging Face / vLLM): for every token that appears in the prompt or in
   the generated tokens, a positive logit is divided by r, a non-positive one multiplied by r;
4. ``frequency_penalty`` f and ``presence_penalty`` p (OpenAI): ``logit -= f * count + p * (count > 0)``
   with ``count`` the token's occurrences among the tokens GENERATED so far (not the prompt);
5. ``grammar`` (structured output, :mod:`dsv3.runtime.grammar`): the tokens the sequence's grammar
   does not allow next at -inf.

That is :func:`penalize`: what log-probabilities are computed from. :func:`truncate` then keeps the
``top_k`` best tokens (ties at the k-th kept) and, for a sampled row, the tokens whose probability at
the row's temperature is at least ``min_p`` times the best one's (``logit >= max + T * log(min_p)``),
by setting the others to -inf; the sample op (temperature, top-p) draws from the result. Both are
masks of the top of the same ranking, so their order does not matter, and neither ever removes the
argmax: a greedy row skips them.

Speculative decoding scores several positions of one sequence at once: :func:`penalize` takes
``appended`` tokens (the drafts) so that position ``p`` sees the sequence's history plus the drafts
before it (a different history at each position of one verify step), and the verifier's target and
the drafter's distributions get exactly the processing plain decoding would give them (the grammar's
matcher is advanced through those drafts and rolled back).

A row without processing (None, or params that change nothing) costs nothing: when no row of a
batch is processed the logits are returned as they are, without a single extra op.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch

from .grammar import Grammar, GrammarRow
from .sampling import SamplingError, is_int, is_real

MAX_PENALTY = 2.0  # OpenAI's range for presence_penalty and frequency_penalty: [-2, 2]
MAX_BIAS = 100.0  # OpenAI's range for logit_bias values: [-100, 100]
# repetition_penalty > 0 (1: off); bounded so that it stays a normal float32 and logits / r stay finite
MIN_REPETITION, MAX_REPETITION = 0.01, 100.0


@dataclass(frozen=True, eq=False)
class LogitsParams:
    """How one sequence's logits are processed (module docstring); the defaults change nothing.

    presence_penalty, frequency_penalty: numbers in [-2, 2] (0: off); repetition_penalty: a number
    in [0.01, 100] (1: off; beyond, float32 logits / r can overflow); logit_bias: {token id (int): bias in [-100, 100]}; top_k: an integer, -1 or 0
    off, else >= 1 (more than the vocabulary keeps it all); min_p: a number in [0, 1] (0: off);
    min_tokens: an integer >= 0 (tokens generated before a stop id may be sampled); grammar: a
    compiled :class:`~dsv3.runtime.grammar.Grammar` the output must follow (None: free text), for the
    same vocabulary size.
    """

    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    top_k: int = 0
    min_p: float = 0.0
    min_tokens: int = 0
    grammar: Grammar | None = None

    def validate(self, vocab_size: int | None = None, max_tokens: int | None = None) -> LogitsParams:
        """Return self, or raise SamplingError naming the first bad field.

        vocab_size: when given, every logit_bias id must be in [0, vocab_size); max_tokens: when
        given, min_tokens must not exceed it.
        """
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_real(v) or not -MAX_PENALTY <= v <= MAX_PENALTY:
                raise SamplingError(name, f"must be a number in [-2, 2] (got {v!r})")
        r = self.repetition_penalty
        if not is_real(r) or not MIN_REPETITION <= r <= MAX_REPETITION:
            raise SamplingError("repetition_penalty", f"must be a number in [0.01, 100] (got {r!r})")
        if not isinstance(self.logit_bias, Mapping):
            raise SamplingError("logit_bias", f"must be a mapping of token ids to biases (got {self.logit_bias!r})")
        for t, b in self.logit_bias.items():
            if not is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size):
                where = f" (vocab_size {vocab_size})" if vocab_size is not None else ""
                raise SamplingError("logit_bias", f"has token id {t!r}, outside the vocabulary{where}")
            if not is_real(b) or not -MAX_BIAS <= b <= MAX_BIAS:
                raise SamplingError("logit_bias", f"values must be numbers in [-100, 100] (got {b!r} for {t})")
        if not is_int(self.top_k) or self.top_k < -1:
            raise SamplingError("top_k", f"must be an integer >= 1, or -1 or 0 for all tokens (got {self.top_k!r})")
        if not is_real(self.min_p) or not 0 <= self.min_p <= 1:
            raise SamplingError("min_p", f"must be a number in [0, 1] (got {self.min_p!r})")
        if not is_int(self.min_tokens) or self.min_tokens < 0:
            raise SamplingError("min_tokens", f"must be an integer >= 0 (got {self.min_tokens!r})")
        if max_tokens is not None and self.min_tokens > max_tokens:
            raise SamplingError("min_tokens", f"must not exceed max_tokens ({self.min_tokens} > {max_tokens})")
        if self.grammar is not None:
            if not isinstance(self.grammar, Grammar):
                raise SamplingError("grammar", f"must be a compiled Grammar (got {self.grammar!r})")
            if vocab_size is not None and self.grammar.vocab_size != vocab_size:
                raise SamplingError(
                    "grammar", f"was compiled for {self.grammar.vocab_size} token ids, the model has {vocab_size}"
                )
            if self.min_tokens:  # the grammar may only allow a stop id, which min_tokens holds back
                raise SamplingError("min_tokens", "cannot be combined with a grammar (structured output)")
        return self

    @property
    def active(self) -> bool:
        """Whether these params change any logits at all (False: the row takes the fast path)."""
        return (
            bool(self.presence_penalty or self.frequency_penalty or self.logit_bias or self.min_tokens)
            or self.grammar is not None
            or self.repetition_penalty != 1
            or self.top_k > 0
            or self.min_p > 0
        )


def logit_bias_of(value: object, param: str = "logit_bias") -> dict[int, float]:
    """A JSON ``logit_bias`` (token ids as decimal strings, as the openai client sends them; int keys
    too) -> {id: bias}; SamplingError naming ``param`` for any other key or a non-number value."""
    if not isinstance(value, Mapping):
        raise SamplingError(param, f"must be an object mapping token ids to biases (got {value!r})")
    out: dict[int, float] = {}
    for k, v in value.items():
        if is_int(k):
            t = int(k)
        elif isinstance(k, str) and re.fullmatch(r"-?[0-9]+", k):
            t = int(k)
        else:
            raise SamplingError(param, f"keys must be token ids (got {k!r})")
        if not is_real(v):
            raise SamplingError(param, f"values must be numbers in [-100, 100] (got {v!r} for {k})")
        out[t] = float(v)
    return out


class RowLogits:
    """One sequence's processing state: its params and what it has seen (prompt, generated tokens).

    ``extend`` records newly generated tokens (only those the sequence keeps: not rejected drafts).
    stop_ids: the ids ``min_tokens`` holds back (the sequence's EOS and extra stop ids). temperature:
    the row's (``min_p`` depends on it; a greedy row is never truncated). generated: tokens already
    generated (a resumed sequence).

    State on ``device``, kept up to date by ``extend`` at the cost of the new tokens only: for
    repetition_penalty the distinct ids of prompt and generated tokens (n,) int64; for the frequency
    and presence penalties a (V,) float32 vector ``f * count + p * (count > 0)`` over the generated
    tokens and a (V,) bool mask of them. The counts themselves are kept on the host. With a grammar, its
    matcher (:class:`~dsv3.runtime.grammar.GrammarRow`, on the host), advanced by ``extend``.
    """

    def __init__(
        self,
        params: LogitsParams,
        prompt: Iterable[int],
        stop_ids: Iterable[int],
        vocab_size: int,
        device: torch.device | str,
        temperature: float = 1.0,
        generated: Iterable[int] = (),
    ):
        self.params, self.vocab_size, self.device = params, vocab_size, torch.device(device)
        p = params
        self.repeats = p.repetition_penalty != 1
        self.counts_tokens = bool(p.presence_penalty or p.frequency_penalty)
        self.penalizes = self.repeats or self.counts_tokens
        self.truncates = temperature > 0 and (p.top_k > 0 or p.min_p > 0)
        self._counts: dict[int, int] = {}  # generated token -> occurrences (host)
        self.penalty = self.in_generated = None
        if self.counts_tokens:
            self.penalty = torch.zeros(vocab_size, dtype=torch.float32, device=self.device)
            self.in_generated = torch.zeros(vocab_size, dtype=torch.bool, device=self.device)
        self._seen: set[int] = set()
        self.seen_ids = None
        if self.repeats:
            self._seen = set(prompt)
            self.seen_ids = torch.tensor(sorted(self._seen), dtype=torch.long, device=self.device)
        self.bias = None
        if p.logit_bias:
            ids = torch.tensor(list(p.logit_bias), dtype=torch.long, device=self.device)
            self.bias = ids, torch.tensor(list(p.logit_bias.values()), dtype=torch.float32, device=self.device)
        stops = sorted(set(stop_ids))
        self.stop = torch.tensor(stops, dtype=torch.long, device=self.device) if p.min_tokens and stops else None
        self.grammar: GrammarRow | None = p.grammar.row(stops, self.device) if p.grammar is not None else None
        self.generated = 0
        self.extend(list(generated))

    @property
    def active(self) -> bool:
        """Whether :func:`penalize` changes this row's logits."""
        return self.penalizes or self.bias is not None or self.stop is not None or self.grammar is not None

    def extend(self, tokens: list[int]) -> None:
        """Record tokens the sequence generated (in order)."""
        self.generated += len(tokens)
        if not tokens:
            return
        if self.grammar is not None:
            self.grammar.extend(tokens)
        if self.counts_tokens:
            for t in tokens:
                self._counts[t] = self._counts.get(t, 0) + 1
            changed = list(dict.fromkeys(tokens))
            f, p = self.params.frequency_penalty, self.params.presence_penalty
            ids = torch.tensor(changed, dtype=torch.long, device=self.device)
            values = [f * self._counts[t] + p for t in changed]
            self.penalty[ids] = torch.tensor(values, dtype=torch.float32, device=self.device)
            self.in_generated[ids] = True
        if self.repeats:
            new = [t for t in dict.fromkeys(tokens) if t not in self._seen]
            if new:
                self._seen.update(new)
                fresh = torch.tensor(new, dtype=torch.long, device=self.device)
                self.seen_ids = torch.cat([self.seen_ids, fresh])

    def _masked_positions(self, seen: int, n_pos: int) -> int:
        """How many of n_pos positions (the first of which follows ``seen`` more tokens) mask the stop ids."""
        if self.stop is None:
            return 0
        return max(0, min(n_pos, self.params.min_tokens - self.generated - seen))


def _as3d(logits: torch.Tensor) -> tuple[torch.Tensor, bool]:
    return (logits.unsqueeze(1), True) if logits.dim() == 2 else (logits, False)


def _repeat(x: torch.Tensor, r: float) -> torch.Tensor:
    """repetition_penalty r on logits x: a positive one divided by r, a non-positive one multiplied."""
    return torch.where(x > 0, x / r, x * r)


def penalize(logits: torch.Tensor, rows: list[RowLogits | None], appended: torch.Tensor | None = None) -> torch.Tensor:
    """Steps 1-4 of the module docstring. logits (B, V) or (B, P, V) float32 -> the same shape.

    rows: one per batch row (None: unprocessed). appended (B, A) int64, A >= P - 1: tokens after each
    row's recorded history, of which position p sees the first ``A - P + 1 + p`` (the verifier's
    drafts: A = P - 1, position p after drafts[:p]; a drafter's earlier drafts: P = 1, all A).
    Returns ``logits`` itself when no row is processed; else a new tensor (the input is not changed).

    The work is sparse: each processed row touches its biased, stop, seen and generated ids, not the
    whole vocabulary (the frequency and presence penalties are one (V,) subtraction per row; a grammar
    one (P, V) mask per row, computed on the host).
    """
    idx = [i for i, r in enumerate(rows) if r is not None and r.active]
    if not idx:
        return logits
    x, flat = _as3d(logits)
    n_pos = x.shape[1]
    n_app = 0 if appended is None else appended.shape[1]
    first_seen = n_app - n_pos + 1  # appended tokens seen at position 0
    if first_seen < 0:
        raise ValueError(f"penalize: {n_pos} positions need at least {n_pos - 1} appended tokens, got {n_app}")
    out = x.clone()
    for i in idx:
        r, y = rows[i], out[i]  # y (P, V): a view
        if r.bias is not None:
            y[:, r.bias[0]] += r.bias[1]
        m = r._masked_positions(first_seen, n_pos)
        if m:
            y[:m, r.stop] = -math.inf
        if r.repeats and len(r.seen_ids):
            y[:, r.seen_ids] = _repeat(y[:, r.seen_ids], r.params.repetition_penalty)
        if r.counts_tokens:
            y -= r.penalty
    drafted = [i for i in idx if rows[i].penalizes] if n_app else []
    if drafted:
        _penalize_appended(out, [rows[i] for i in drafted], drafted, appended, first_seen)
    for i in idx:  # last: what the grammar does not allow stays -inf whatever the penalties did
        g = rows[i].grammar
        if g is not None:
            prefix = appended[i, : first_seen + n_pos - 1].tolist() if n_app else []
            g.mask_(out[i], prefix)
    return out.squeeze(1) if flat else out


def _penalize_appended(
    out: torch.Tensor, rows: list[RowLogits], idx: list[int], appended: torch.Tensor, first_seen: int
) -> None:
    """The penalties the appended tokens add, in place on ``out`` (B, P, V) already penalized for each
    row's recorded history: position p of row i also sees ``appended[i, :first_seen + p]``.

    A token appended at a < first_seen + p counts once more for the frequency penalty at p; its first
    occurrence there adds the presence penalty if it was not generated before, and the repetition
    penalty if it was in neither the prompt nor the generated tokens. (m rows, A appended, P positions.)
    """
    dev = out.device
    n_pos, n_app = out.shape[1], appended.shape[1]
    sel = torch.tensor(idx, dtype=torch.long, device=dev)
    d = appended.index_select(0, sel)  # (m, A)
    pos = torch.arange(n_pos, device=dev).unsqueeze(1)
    a = torch.arange(n_app, device=dev)
    within = a.unsqueeze(0) < first_seen + pos  # (P, A): position p sees appended token a
    same = d.unsqueeze(2) == d.unsqueeze(1)  # (m, A, A)
    first = ~(same & (a.unsqueeze(0) < a.unsqueeze(1))).any(-1)  # (m, A): no earlier equal token
    # (m, P, A): some occurrence of token d[a] is seen at position p
    seen_here = (same.unsqueeze(1) & within.view(1, n_pos, 1, n_app)).any(-1)
    where = d.unsqueeze(1).expand(-1, n_pos, -1)  # (m, P, A): the appended ids at each position
    for j, (i, r) in enumerate(zip(idx, rows, strict=True)):
        y = out[i]  # (P, V)
        if r.repeats:
            fresh = ~torch.isin(d[j], r.seen_ids)  # (A,): neither in the prompt nor generated
            vals = y.gather(-1, where[j])  # (P, A); equal ids give equal values: the scatter agrees
            hit = seen_here[j] & fresh
            y.scatter_(-1, where[j], torch.where(hit, _repeat(vals, r.params.repetition_penalty), vals))
        if r.counts_tokens:
            p = r.params
            new_token = first[j] & ~r.in_generated[d[j]]  # (A,)
            delta = within.float() * (p.frequency_penalty + p.presence_penalty * new_token.float())  # (P, A)
            y.scatter_add_(-1, where[j], -delta)


def truncate(logits: torch.Tensor, rows: list[RowLogits | None], temperature: torch.Tensor) -> torch.Tensor:
    """top_k and min_p (module docstring): logits (B, V) or (B, P, V) float32, temperature (B,) -> same shape.

    The dropped tokens become -inf. Returns ``logits`` itself when no row truncates (greedy rows never do).
    """
    idx = [i for i, r in enumerate(rows) if r is not None and r.truncates]
    if not idx:
        return logits
    x, flat = _as3d(logits)
    dev, v = x.device, x.shape[-1]
    sel = torch.tensor(idx, dtype=torch.long, device=dev)
    sub = x.index_select(0, sel)  # (n, P, V)
    params = [rows[i].params for i in idx]
    keep = torch.ones_like(sub, dtype=torch.bool)
    if any(p.top_k > 0 for p in params):
        k = torch.tensor([min(p.top_k, v) if p.top_k > 0 else v for p in params], device=dev)
        kth = sub.topk(int(k.max()), dim=-1).values.gather(-1, (k - 1).view(-1, 1, 1).expand(-1, sub.shape[1], 1))
        keep &= sub >= kth  # ties with the k-th are kept
    if any(p.min_p > 0 for p in params):
        log_min_p = torch.tensor([math.log(p.min_p) if p.min_p > 0 else -math.inf for p in params], device=dev)
        t = temperature.float().index_select(0, sel)
        keep &= sub >= sub.amax(-1, keepdim=True) + (t * log_min_p).view(-1, 1, 1)
    sub = sub.masked_fill(~keep, -math.inf)
    out = sub if len(idx) == x.shape[0] else x.index_copy(0, sel, sub)
    return out.squeeze(1) if flat else out


def process(
    logits: torch.Tensor,
    rows: list[RowLogits | None] | None,
    temperature: torch.Tensor,
    appended: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole stage: logits (B, V) or (B, P, V) float32 -> (penalized, to sample from), each that shape.

    ``penalized`` (:func:`penalize`) is what log-probabilities are computed from; ``to sample from``
    adds :func:`truncate` and goes to the sample op / the speculative p and q. rows None: nothing to do.
    """
    if rows is None:
        return logits, logits
    scored = penalize(logits, rows, appended)
    return scored, truncate(scored, rows, temperature)


def row_logits(
    params: LogitsParams | None,
    prompt: Iterable[int],
    stop_ids: Iterable[int],
    vocab_size: int,
    device: torch.device | str,
    temperature: float,
    generated: Iterable[int] = (),
) -> RowLogits | None:
    """A :class:`RowLogits` for a sequence whose params change something, else None (the fast path)."""
    if params is None or not params.active:
        return None
    return RowLogits(params, prompt, stop_ids, vocab_size, device, temperature, generated)
