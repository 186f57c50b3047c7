"""Batched generation with a KV cache: prefill every prompt at once, then decode step by step.

Rows keep their own positions, so prompts of different lengths share one batch without
padding masks: a row's cache entries past its position are never attended to.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import Dsv3Error
from ..model.cache import ModelCache
from ..model.graph import Transformer
from .distributed import agree_on_seed
from .graphs import DecodeGraphs, backend_capture
from .logits_processing import LogitsParams, RowLogits, process, row_logits
from .sampling import SamplingError, finite_logits, is_int, is_real

SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes; a negative seed s draws as s + 2**64


@dataclass
class SamplingParams:
    """temperature 0 is greedy; top_p 1 keeps every token; seed makes sampling reproducible.

    Valid values (``validate``): max_new_tokens an integer >= 1; temperature a finite number >= 0;
    top_p a number in (0, 1] (one so small that no token reaches it keeps the most likely token);
    seed None or an integer in [-2**63, 2**64) (a negative seed s draws as s + 2**64).
    logits: penalties, logit_bias, top_k, min_p, min_tokens (:class:`LogitsParams`, checked by its
    ``validate``; min_tokens at most max_new_tokens). stop_token_ids: token ids that end a row as an
    EOS id does ("stop"), besides ``eos_ids``; min_tokens holds both back.
    """

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    eos_ids: tuple[int, ...] = ()
    logits: LogitsParams = field(default_factory=LogitsParams)
    stop_token_ids: tuple[int, ...] = ()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Every id that ends a row: ``eos_ids`` and ``stop_token_ids``."""
        return tuple(sorted(set(self.eos_ids) | set(self.stop_token_ids)))

    def validate(self, vocab_size: int | None = None) -> SamplingParams:
        """Return self, or raise SamplingError naming the first bad field (token ids are checked against
        ``vocab_size`` when it is given)."""
        if not is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise SamplingError("max_new_tokens", f"must be an integer >= 1 (got {self.max_new_tokens!r})")
        if not is_real(self.temperature) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise SamplingError("temperature", f"must be a finite number >= 0 (got {self.temperature!r})")
        if not is_real(self.top_p) or not 0 < self.top_p <= 1:
            raise SamplingError("top_p", f"must be a number in (0, 1] (got {self.top_p!r})")
        lo, hi = SEED_RANGE
        if self.seed is not None and (not is_int(self.seed) or not lo <= self.seed < hi):
            raise SamplingError("seed", f"must be an integer in [-2**63, 2**64) (got {self.seed!r})")
        if not isinstance(self.logits, LogitsParams):
            raise SamplingError("logits", f"must be a LogitsParams (got {self.logits!r})")
        self.logits.validate(vocab_size, self.max_new_tokens)
        for t in self.stop_token_ids:
            if not is_int(t) or t < 0 or (vocab_size is not None and t >= vocab_size):
                raise SamplingError("stop_token_ids", f"has token id {t!r}, outside the vocabulary")
        if self.logits.min_tokens and vocab_size is not None and len(self.stop_ids) >= vocab_size:
            raise SamplingError("stop_token_ids", "with min_tokens must leave some token to generate")
        return self

    def row_logits(self, prompt: list[int], vocab_size: int, device: torch.device | str) -> RowLogits | None:
        """The processing state of one row with this prompt (None when ``logits`` changes nothing)."""
        return row_logits(self.logits, prompt, self.stop_ids, vocab_size, device, self.temperature)


@dataclass
class GenerationOutput:
    token_ids: list[list[int]]
    finish_reasons: list[str]
    stats: dict = field(default_factory=dict)


def check_lengths(model: Transformer, prompts: list[list[int]], max_new_tokens: int) -> int:
    """Total cache length needed; a clear error when a prompt cannot fit the model's context."""
    if not prompts:
        raise Dsv3Error("no prompts given")
    limit = model.cfg.max_position_embeddings
    for i, p in enumerate(prompts):
        if not p:
            raise Dsv3Error(f"prompt {i} is empty")
        bad = next((t for t in p if not 0 <= t < model.cfg.vocab_size), None)
        if bad is not None:
            raise Dsv3Error(
                f"prompt {i} has token id {bad}, outside the vocabulary (vocab_size {model.cfg.vocab_size})"
            )
        if len(p) + max_new_tokens > limit:
            raise Dsv3Error(
                f"prompt {i} has {len(p)} tokens; with max_new_tokens={max_new_tokens} it exceeds the model's "
                f"limit of {limit} positions (max_position_embeddings)"
            )
    return max(len(p) for p in prompts) + max_new_tokens


def prefill(model: Transformer, prompts: list[list[int]], cache: ModelCache) -> torch.Tensor:
    """Run all prompts (right-padded) through the model; returns each row's last hidden state (B, D)."""
    device = model.embed.device
    lens = torch.tensor([len(p) for p in prompts], device=device)
    width = int(lens.max())
    tokens = torch.zeros(len(prompts), width, dtype=torch.long, device=device)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = torch.tensor(p, device=device)
    positions = torch.arange(width, device=device).expand(len(prompts), width)
    hidden = model(tokens, positions, cache)  # (B, W, D)
    return hidden[torch.arange(len(prompts), device=device), lens - 1]


@dataclass
class DecodeStep:
    """What one decode step produced: ``tokens[i]``, the new token ids of row i.

    Plain decoding gives each running row one token per step; speculative decoding gives the
    accepted drafts and the main model's token. A row that has finished gets ``[]``. The last step
    of a run also carries ``finish_reasons`` ("stop" at an EOS id, else "length") and ``stats``.
    """

    tokens: list[list[int]]
    finish_reasons: list[str] | None = None
    stats: dict | None = None


def collect(steps: Iterable[DecodeStep], batch: int) -> GenerationOutput:
    """The whole output of a run of decode steps (``generate_steps`` or ``speculative_steps``)."""
    out: list[list[int]] = [[] for _ in range(batch)]
    for step in steps:
        for row, new in zip(out, step.tokens, strict=True):
            row.extend(new)
        if step.finish_reasons is not None:
            return GenerationOutput(out, step.finish_reasons, step.stats or {})
    raise RuntimeError("decode steps ended without finish reasons")  # a bug in the step generator


def generate_steps(
    model: Transformer, prompts: list[list[int]], params: SamplingParams, enforce_eager: bool = False
) -> Iterator[DecodeStep]:
    """Generate like :func:`generate`, yielding each step's new tokens as soon as they are sampled.

    Bad prompts or parameters raise here, at the call. The first step comes after the prefill alone,
    before any decode forward. The last step carries the finish reasons and ``stats``: ``ttft_s``
    (call to first token) and ``decode_s`` (first token to the last), wall clock, including whatever
    time the consumer spends between steps, and the graph counters of :meth:`DecodeGraphs.stats`.
    Decode steps replay captured graphs when the backend captures (``dsv3.runtime.graphs``), unless
    ``enforce_eager``.
    """
    start = time.perf_counter()
    total = check_lengths(model, prompts, params.validate(model.cfg.vocab_size).max_new_tokens)
    return _decode(model, prompts, params, total, start, enforce_eager)


@torch.inference_mode()
def _decode(
    model: Transformer, prompts: list[list[int]], params: SamplingParams, total: int, start: float, enforce_eager: bool
) -> Iterator[DecodeStep]:
    device = model.embed.device
    b = len(prompts)
    capture = backend_capture(model, enforce_eager)
    cache = model.new_cache(b + (capture is not None), total)  # row b pads captured steps (dsv3.runtime.graphs)
    graphs = DecodeGraphs(model, cache, pad_row=b, max_batch=b, capture=capture)
    sample = model.ops.sample
    generator = None
    seed = agree_on_seed(model.opts.parallel, params.seed, params.temperature)  # same draws on every rank
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    temperature = torch.full((b,), float(params.temperature), device=device)
    top_p = torch.full((b,), float(params.top_p), device=device)
    stop_ids = params.stop_ids
    eos = torch.tensor(stop_ids or [-1], device=device)
    rows = [params.row_logits(p, model.cfg.vocab_size, device) for p in prompts]
    rows = rows if any(r is not None for r in rows) else None  # None: no processing at all

    logits = model.logits(prefill(model, prompts, cache))
    positions = torch.tensor([len(p) for p in prompts], device=device)  # where each row's next token goes
    last: list[int | None] = [None] * b  # each row's newest token
    done = torch.zeros(b, dtype=torch.bool, device=device)
    first = None
    for step in range(params.max_new_tokens):
        logits = process(finite_logits(logits), rows, temperature)[1]
        next_tokens = sample(logits, temperature, top_p, generator)  # (B,)
        tokens = next_tokens.tolist()  # one copy to the host per step, not one per row
        new: list[list[int]] = [[] for _ in range(b)]
        for i in (~done).nonzero().flatten().tolist():
            new[i] = [tokens[i]]
            last[i] = tokens[i]
            if rows is not None and rows[i] is not None:
                rows[i].extend(new[i])
        if first is None:
            first = time.perf_counter()
        done |= torch.isin(next_tokens, eos)
        if bool(done.all()) or step == params.max_new_tokens - 1:
            reasons = ["stop" if t is not None and t in stop_ids else "length" for t in last]
            stats = {"ttft_s": first - start, "decode_s": time.perf_counter() - first, **graphs.stats()}
            yield DecodeStep(new, reasons, stats)
            return
        yield DecodeStep(new)
        logits = graphs(next_tokens, positions, None)
        positions = positions + 1


def generate(
    model: Transformer, prompts: list[list[int]], params: SamplingParams, enforce_eager: bool = False
) -> GenerationOutput:
    """Generate up to ``params.max_new_tokens`` tokens after each prompt; stop a row at EOS.

    ``stats``: ``ttft_s`` (call to first token, wall clock) and ``decode_s`` (first token to the last),
    and the graph counters (:func:`generate_steps`).
    """
    return collect(generate_steps(model, prompts, params, enforce_eager), len(prompts))
