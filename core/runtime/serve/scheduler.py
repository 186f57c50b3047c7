"""Continuous batching: one thread owns the model, ``max_batch`` cache rows (slots) and a pool of cache pages.

Each running request has a slot (a row of the :class:`~dsv3.model.cache.ModelCache`'s block table:
up to ``max_len`` positions) and the pages its positions live in, taken from a
:class:`~dsv3.runtime.serve.pages.PagePool` of ``max_total_tokens`` positions as it needs them:
its prompt's pages when it is admitted, one more page whenever decoding crosses a page boundary.
So memory is spent on tokens that exist, not on ``max_batch x max_len``. A request is admitted
(first come, first served) when a slot is free and the pool has pages for its prompt. When a
running request needs a page and none is left, the most recently admitted request is preempted:
its pages are freed and it goes back to the front of the queue with what it generated so far;
readmitted, it prefills its prompt and those tokens again (recompute) and goes on decoding,
without sending a token twice. With prefix caching, a prompt's full pages stay cached after the
request ends (until their pages are needed), and a later prompt starting with the same tokens
reads them instead of prefilling them (see ``pages.py``); the naive attention form (contiguous
rows, no pages) runs without it.

The loop, between two decode steps: drop cancelled requests (their slots and pages become free), admit
waiting requests, prefill admitted prompts alone into their slots, at most
``prefill_chunk`` prompt tokens per loop (chunked prefill: a long prompt is spread over several
loops so running requests keep getting tokens; a request's first token is sampled when its whole
prompt is in), then run ONE decode step over every active slot at its own position. A request
joins and leaves the running batch without waiting for the others.

Sampling is per row: greedy rows and unseeded rows share one ``dsv3_op_sample`` call; a row with
a seed is drawn alone with its own generator, so a seeded request draws exactly what
``dsv3 run --seed`` draws for that prompt alone.

Each request may carry its own logits processing (``processing``: penalties, logit_bias, top_k, min_p,
min_tokens; :mod:`dsv3.runtime.logits_processing`), applied in plain decoding and in the speculative
verifier alike; rows without it take the unprocessed fast path.

A request may ask for log-probabilities (``logprobs``: top-k): each sampled token's comes from the
logits it was drawn from, after its penalties, logit_bias and min_tokens (before top_k, min_p,
temperature and top-p); with ``prompt_logprobs`` its prompt is scored by its own prefill (the logits
at every prompt position, chunk by chunk), and ``max_tokens=0`` then ends it without sampling. Plain
decoding only: with ``mtp`` the server refuses these requests.

With ``mtp=K`` (speculative decoding with the checkpoint's MTP module) the same loop runs
:class:`dsv3.runtime.speculative.SpecDecoder` steps instead of plain decode steps: every active slot drafts
K tokens, one main-model forward verifies them all, and each slot streams its accepted drafts plus
the main model's token (1 to K + 1 tokens per step) and moves on by that many positions. Requests
still join and leave between steps; a seeded request draws exactly what ``dsv3 run --mtp K --seed``
draws for that prompt alone.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import math
import random
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ...errors import Dsv3Error
from ...model.cache import cache_rows
from ...model.graph import Transformer
from ..graphs import DecodeGraphs, backend_capture
from ..logits_processing import LogitsParams, RowLogits, penalize, row_logits, truncate
from ..sampling import finite_logits, sample_rows
from ..speculative import RowSampler, SpecDecoder
from .pages import PagePool

MIN_LOGPROB = -9999.0  # a token the processing masked (-inf) shows this, as vLLM shows it: JSON has no -inf


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the distribution its row's sampler reads: log_softmax of the
    float32 logits after the request's penalties, logit_bias and min_tokens mask (the raw logits for a
    request without them), before top_k, min_p, temperature and top-p; and the ``top`` most likely
    (token id, log-probability), best first. A masked token's is ``MIN_LOGPROB``."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def token_logprobs(logits: torch.Tensor, chosen: list[int], k: int) -> list[TokenLogprob]:
    """logits (N, V) float32 and one chosen token per row -> its log-probability and the top ``k``.

    ``logits`` are those the sampler read, after penalties (:func:`dsv3.runtime.logits_processing.penalize`);
    -inf (a masked token) comes out as ``MIN_LOGPROB``.
    """
    lp = logits.float().log_softmax(-1).clamp(min=MIN_LOGPROB)
    picked = lp.gather(-1, torch.tensor(chosen, dtype=torch.long, device=lp.device).unsqueeze(-1))[:, 0].tolist()
    if k == 0:
        return [TokenLogprob(v) for v in picked]
    vals, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)  # a vocabulary smaller than k: all of it
    return [
        TokenLogprob(v, tuple(zip(i, t, strict=True)))
        for v, i, t in zip(picked, ids.tolist(), vals.tolist(), strict=True)
    ]


@dataclass(frozen=True)
class Event:
    """What a request hears from the scheduler: new token ids, then (once) how it finished.

    finish_reason: ``"stop"`` (a stop token), ``"length"`` (max_tokens or the slot's length) or
    ``None`` while running. error: a one-line message when the model failed (then finished).
    """

    tokens: tuple[int, ...] = ()
    finish_reason: str | None = None
    error: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token in ``tokens`` when the request asked for them
    prompt_logprobs: tuple[TokenLogprob, ...] | None = None  # prompt tokens 1.. (once, with the first event)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None or self.error is not None


@dataclass(eq=False)
class Request:
    """One sequence to generate. ``sink`` is called from the scheduler thread with each Event.

    prompt: token ids (non-empty, within the vocabulary); ``len(prompt) + max_tokens`` must fit the
    scheduler's ``max_len`` (the server checks it). stop_ids: token ids that end the request
    (the checkpoint's EOS ids, or none to ignore them, and any extra stop ids); processing: penalties,
    logit_bias, top_k, min_p, min_tokens (None: none; min_tokens holds ``stop_ids`` back).
    group: requests submitted together with one prompt and one group id (the choices of ``n``); the
    first admitted prefills the prompt and the others waiting are forked from it (see ``_fork``).
    """

    prompt: list[int]
    max_tokens: int
    sink: Callable[[Event], None]
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_ids: frozenset[int] = frozenset()
    logprobs: int | None = None  # top-k log-probabilities per generated token (None: none)
    prompt_logprobs: bool = False  # also the prompt's (needs ``logprobs``); max_tokens may then be 0
    processing: LogitsParams | None = None
    group: int | None = None  # requests of one group share a prompt: it is prefilled once (``n`` choices)
    id: int = field(default_factory=itertools.count().__next__)
    cancelled: bool = False


class SchedulerBusy(Exception):
    """The waiting queue is full or the scheduler is stopping."""


@dataclass(eq=False)
class _Active:
    """A request's state from submission to its end (queued again as it is when preempted)."""

    req: Request
    slot: int = -1  # its cache row while admitted
    pos: int = 0  # where the pending token goes
    token: int = 0  # the newest sampled token, not yet seen by the model
    generated: int = 0
    generator: torch.Generator | None = None
    prefilled: int = 0  # tokens of ``seq`` already in the cache
    prompt_lps: list[TokenLogprob] = field(default_factory=list)  # for the prompt tokens 1 .. prefilled
    proc: RowLogits | None = None  # its logits processing state (None: the fast path)
    output: list[int] = field(default_factory=list)  # tokens sent so far
    pages: list[int] = field(default_factory=list)  # its cache pages, in position order
    registered: int = 0  # of them, how many are known to the prefix cache
    keys: list[bytes] | None = None  # the prefix keys of ``seq``'s full pages

    @property
    def seq(self) -> list[int]:
        """The tokens to prefill: the prompt, or after a preemption also what was sent but the newest."""
        return self.req.prompt + self.output[:-1]

    @property
    def resumed(self) -> bool:
        return bool(self.output)


class Scheduler:
    """Runs requests on ``model`` with continuous batching (see the module docstring).

    max_batch: cache slots (rows decoded together); max_len: positions per slot;
    max_waiting: requests queued for a slot before ``submit`` refuses more; mtp: draft tokens per
    step for speculative decoding (0: plain continuous batching); prefill_chunk: prompt tokens
    prefilled per loop, between two decode steps (0: every admitted prompt whole);
    max_total_tokens: positions the page pool holds (default ``max_batch x`` a slot's positions:
    never a preemption); prefix_caching: keep and reuse prompts' full pages (paged caches only);
    page_size: positions per page (default the model's BuildOptions.page_size); enforce_eager: never
    replay captured decode steps (``dsv3.runtime.graphs``; they are used, without MTP, when the backend
    captures).
    """

    def __init__(
        self,
        model: Transformer,
        max_batch: int,
        max_len: int,
        max_waiting: int = 256,
        mtp: int = 0,
        prefill_chunk: int = 0,
        max_total_tokens: int | None = None,
        prefix_caching: bool = True,
        page_size: int | None = None,
        enforce_eager: bool = False,
    ):
        self.model = model
        self.max_batch = max_batch
        self.max_len, self.max_waiting, self.mtp = max_len, max_waiting, mtp
        if not isinstance(prefill_chunk, int) or prefill_chunk < 0:
            raise Dsv3Error(f"prefill_chunk must be an integer >= 0 (0: whole prompts); got {prefill_chunk!r}")
        self.prefill_chunk = prefill_chunk
        self.slot_len = max_len + (mtp + 1 if mtp else 0)  # verification reads K + 1 positions past the last token
        self.paged = model.opts.attn_impl != "naive"
        page_size = (page_size or model.opts.page_size) if self.paged else self.slot_len
        slot_pages = -(-self.slot_len // page_size)
        if max_total_tokens is None or not self.paged:  # the naive form's rows are contiguous: slots are the pool
            num_pages = max_batch * slot_pages
        else:
            num_pages = -(-max_total_tokens // page_size)
            if num_pages < slot_pages:
                raise Dsv3Error(
                    f"--max-total-tokens {max_total_tokens} cannot hold one request of --max-model-len {max_len} "
                    f"({slot_pages * page_size} positions in pages of {page_size}): raise it or lower --max-model-len"
                )
        # an MTP layer's entry at position t reads tokens t+1 .. t+D, so a cached page's key covers them too
        lookahead = min(mtp, len(model.mtp)) if mtp else 0
        self.pool = PagePool(num_pages, page_size, prefix_caching and self.paged, lookahead)
        self.max_total_tokens = num_pages * page_size
        self._capture = None if mtp else backend_capture(model, enforce_eager)
        self._graphs: DecodeGraphs | None = None
        self._forking = self.paged and not mtp  # the choices of one prompt fork from its prefill (``_fork``)
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Active] = collections.deque()
        self._free = list(range(self.max_batch))  # a heap: the lowest free slot is used first
        self._active: dict[int, _Active] = {}  # slot -> its request
        self._prefilling: collections.deque[_Active] = collections.deque()  # admitted, prompt not all in
        self._spec: SpecDecoder | None = None  # mtp mode
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._shared_gen = torch.Generator(device=model.embed.device).manual_seed(random.SystemRandom().getrandbits(63))
        self.counters = collections.Counter()
        self.peak_batch = 0
        self.fatal: str | None = None

    # ------------------------------------------------------------ from any thread
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="dsv3-scheduler", daemon=True)
            self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Finish every pending request with an error and stop the thread (after its current step).

        timeout: seconds to wait for the thread (None: until the step in progress ends).
        """
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, req: Request) -> None:
        """Queue ``req`` for a slot; SchedulerBusy when the queue is full or the scheduler stops."""
        with self._cond:
            if self._stopping or self.fatal:
                raise SchedulerBusy("the server is shutting down")
            if len(self._waiting) >= self.max_waiting:
                raise SchedulerBusy(f"the server is at capacity ({self.max_waiting} requests waiting)")
            self._waiting.append(_Active(req))
            self.counters["submitted"] += 1
            self._cond.notify_all()

    def cancel(self, req: Request) -> None:
        """Stop generating for ``req`` (a client went away or its stop string appeared); idempotent.

        Its slot is freed before the next decode step; no more events are sent to it.
        """
        if req.cancelled:
            return
        req.cancelled = True
        with self._cond:
            self.counters["cancelled"] += 1
            self._cond.notify_all()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict:
        """Slot usage and counters (for /health)."""
        out = {
            "slots_total": self.max_batch,
            "slots_used": len(self._active) + len(self._prefilling),
            "prefilling": len(self._prefilling),
            "waiting": len(self._waiting),
            "max_model_len": self.max_len,
            "max_total_tokens": self.max_total_tokens,
            "prefix_caching": self.pool.prefix_caching,
            **self.pool.stats(),
            "mtp": self.mtp,
            "peak_batch": self.peak_batch,
            **{
                k: self.counters[k]
                for k in (
                    "submitted",
                    "finished",
                    "cancelled",
                    "errors",
                    "tokens",
                    "steps",
                    "preempted",
                    "forked",
                    "prefill_tokens",
                    "prefix_hit_tokens",
                )
            },
        }
        if self.mtp:  # drafts made for running requests, and how many of them the main model accepted
            out.update({k: self.counters[k] for k in ("drafts", "accepted_drafts")})
        if self._graphs is not None:  # captured decode steps (dsv3.runtime.graphs)
            out["decode_graphs"] = self._graphs.stats()
        return out

    # ------------------------------------------------------------ the scheduler thread
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                # with graphs, one more row and one more page, outside the pool: captured steps' padding rows
                pad = self._capture is not None
                pages = self.pool.num_pages
                self._cache = self.model.new_cache(
                    self.max_batch + pad, self.slot_len, page_size=self.pool.page_size, num_pages=pages + pad
                )
                if pad:
                    self.model.set_pages(self._cache, self.max_batch, 0, [pages])
                self._graphs = DecodeGraphs(self.model, self._cache, self.max_batch, self.max_batch, self._capture)
                if self.mtp:
                    self._spec = SpecDecoder(self.model, self._cache, self.mtp)
                self._loop()
        except BaseException as exc:  # keep /health honest if the thread itself dies
            self.fatal = f"{type(exc).__name__}: {exc}"
            raise
        finally:
            self._fail_all("the server is shutting down" if self.fatal is None else f"scheduler failed: {self.fatal}")

    def _take_admissions(self) -> bool:
        """Wait for work; drop cancelled requests; admit waiting ones, first come first served, while a slot
        is free and the pool has pages for the prompt (after its cached prefix). False: stop."""
        with self._cond:
            while not self._stopping and not self._waiting and not self._active and not self._prefilling:
                self._cond.wait()
            if self._stopping:
                return False
            for a in [a for a in self._active.values() if a.req.cancelled]:
                self._release(a)
            for a in [a for a in self._prefilling if a.req.cancelled]:
                self._prefilling.remove(a)
                self._release(a)
            if any(a.req.cancelled for a in self._waiting):
                self._waiting = collections.deque(a for a in self._waiting if not a.req.cancelled)
            admitted = []
            while (
                self._waiting
                and self._free
                and not self._forks_later(self._waiting[0])
                and self._admit(self._waiting[0])
            ):
                a = self._waiting.popleft()
                a.slot = heapq.heappop(self._free)
                self._prefilling.append(a)
                admitted.append(a)
        for a in admitted:  # a model call (mirrored to the other ranks): outside the lock /health takes
            self.model.set_pages(self._cache, a.slot, 0, a.pages)
        return True

    def _admit(self, a: _Active) -> bool:
        """Give ``a`` the pages of its prefill: its cached prefix, then new ones. False: not enough pages."""
        pool, seq = self.pool, a.seq
        # the last `recompute` tokens are prefilled even when cached: the first sample needs their logits,
        # and an MTP step's first window needs their hidden states
        if pool.prefix_caching and a.keys is None:
            a.keys = pool.keys(seq)
        limit = self._shareable_pages(seq)
        if a.req.prompt_logprobs and not a.resumed:  # every prompt position is scored: nothing may be skipped
            limit = 0
        cached = pool.match(a.keys, limit) if pool.prefix_caching else []
        if pool.prefix_caching and len(cached) < min(limit, len(a.keys)) and a.keys[len(cached)] in self._writing():
            pool.release(cached)  # an admitted prompt is prefilling the next page: wait and read it instead
            return False
        fresh = pool.allocate(pool.pages_for(len(seq)) - len(cached))
        if fresh is None:
            pool.release(cached)
            return False
        pool.hit_pages += len(cached)
        a.pages, a.registered = cached + fresh, len(cached)
        a.prefilled = len(cached) * pool.page_size
        self.counters["prefix_hit_tokens"] += a.prefilled
        return True

    def _forks_later(self, a: _Active) -> bool:
        """``a`` will be forked from a request of its group that is prefilling the same prompt now."""
        group = a.req.group
        return (
            group is not None
            and self._forking
            and not a.resumed
            and any(b.req.group == group and not b.resumed and b.req.prompt == a.req.prompt for b in self._prefilling)
        )

    def _fork(self, a: _Active) -> list[_Active]:
        """The waiting requests of ``a``'s group, given ``a``'s prompt cache as their own (``a`` just prefilled it).

        Each gets a slot, the prompt's full pages by reference and a copy of its last partial page (it
        will write there), so the prompt is prefilled once for all ``n`` choices. A request that finds
        no free slot or page stays waiting (and prefills on its own later, reading the cached prefix).
        Paged plain decoding only: with ``mtp`` the speculative decoder's per-slot state is not copied,
        and the naive form's contiguous rows have no pages to share.
        """
        group, forked = a.req.group, []
        if group is None or not self._forking or a.resumed:
            return forked
        n, size = len(a.req.prompt), self.pool.page_size
        full = n // size
        for b in [b for b in self._waiting if b.req.group == group and not b.resumed and not b.req.cancelled]:
            if b.req.prompt != a.req.prompt or not self._free:
                continue
            partial = self.pool.allocate(len(a.pages) - full)
            if partial is None:
                break
            with self._cond:
                self._waiting.remove(b)
                b.slot = heapq.heappop(self._free)
                self._active[b.slot] = b
            self.pool.share(a.pages[:full])
            b.pages, b.registered, b.keys = a.pages[:full] + partial, min(full, a.registered), a.keys
            for src, dst in zip(a.pages[full:], partial, strict=True):
                self.model.copy_page(self._cache, src, dst)
            self.model.set_pages(self._cache, b.slot, 0, b.pages)
            if b.generator is None:
                self._seed(b)
            b.prefilled, b.pos, b.prompt_lps = n, n, list(a.prompt_lps)
            self.counters["forked"] += 1
            forked.append(b)
        return forked

    def _writing(self) -> set[bytes]:
        """Prefix keys of the pages that requests still prefilling will register."""
        return {key for a in self._prefilling if a.keys for key in a.keys[a.registered :]}

    def _make_room(self, rows: list[_Active]) -> list[_Active]:
        """Give each decoding row the pages its next step writes (``pos .. pos + K``), preempting the most
        recently admitted requests while the pool is short. Returns the rows still running."""
        order = {id(a): i for i, a in enumerate(self._admission_order())}
        for a in sorted(rows, key=lambda a: order[id(a)]):
            while a.slot >= 0:
                need = self.pool.pages_for(a.pos + 1 + self.mtp) - len(a.pages)
                if need <= 0:
                    break
                fresh = self.pool.allocate(need)
                if fresh is not None:
                    self.model.set_pages(self._cache, a.slot, len(a.pages), fresh)
                    a.pages += fresh
                    break
                self._preempt(self._admission_order()[-1])
        return [a for a in rows if a.slot >= 0]

    def _admission_order(self) -> list[_Active]:
        """Admitted requests, oldest admission first (decoding ones, then those still prefilling)."""
        return list(self._active.values()) + list(self._prefilling)

    def _preempt(self, a: _Active) -> None:
        """Free ``a``'s slot and pages and queue it first again: readmitted, it prefills what it has so far."""
        with self._cond:
            if a in self._prefilling:
                self._prefilling.remove(a)
            self._release(a)
            if not a.resumed:  # its prompt is scored again from the start
                a.prompt_lps = []
            a.keys = None
            self._waiting.appendleft(a)
        self.counters["preempted"] += 1

    def _loop(self) -> None:
        while True:
            if not self._take_admissions():
                return
            prefill, decode = (self._prefill_mtp, self._decode_mtp) if self.mtp else (self._prefill, self._decode)
            budget = self.prefill_chunk or math.inf
            while self._prefilling and budget > 0:
                a = self._prefilling[0]
                stop = int(min(len(a.seq), a.prefilled + budget))
                budget -= stop - a.prefilled
                if not self._guarded([a], lambda rows, stop=stop, step=prefill: step(rows[0], stop)):
                    with self._cond:
                        if a in self._prefilling:
                            self._prefilling.remove(a)
            rows = self._make_room(list(self._active.values()))
            if rows:
                self._guarded(rows, decode)

    def _guarded(self, rows: list[_Active], step: Callable[[list[_Active]], None]) -> bool:
        """Run a model step; a failure ends the requests it concerned with an error, and the server goes on.

        Returns whether the step succeeded.
        """
        try:
            step(rows)
            return True
        except Exception as exc:  # e.g. out of memory: those requests fail, the others continue
            self._fail(rows, exc)
            return False

    def _fail(self, rows: list[_Active], exc: Exception) -> None:
        """End ``rows`` with the one-line error of ``exc`` and free their slots and pages."""
        message = f"generation failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        for a in rows:
            self.counters["errors"] += 1
            if not a.req.cancelled:
                a.req.sink(Event(error=message))
            with self._cond:
                self._release(a)

    def _release(self, a: _Active) -> None:
        """Free ``a``'s slot and pages; its registered pages stay cached (caller holds the lock)."""
        if a.slot < 0:
            return
        if self._active.get(a.slot) is a:
            del self._active[a.slot]
        heapq.heappush(self._free, a.slot)
        self.pool.release(a.pages)
        a.slot, a.pages, a.registered = -1, [], 0

    def _rows(self, slots: list[int]) -> torch.Tensor | None:
        return cache_rows(slots, self.model.embed.device)

    def _activate(self, a: _Active) -> None:
        """a's prompt is all in: it joins the decoding batch (one lock: /health never counts it twice)."""
        with self._cond:
            self._prefilling.remove(a)
            self._active[a.slot] = a

    def _shareable_pages(self, seq: list[int]) -> int:
        """Pages of ``seq`` that are final once prefilled: the last token (under MTP the last ``window``, which
        the first steps' MTP window rewrites) is always recomputed, for the first sample's logits."""
        recompute = self._spec.window if self.mtp else 1
        return max(0, len(seq) - recompute) // self.pool.page_size

    def _prefilled(self, a: _Active, stop: int) -> None:
        """``a``'s tokens up to ``stop`` are in: its full pages whose keys are known and whose entries no later
        step rewrites join the prefix cache."""
        a.prefilled = stop
        if self.pool.prefix_caching:
            done = min(stop // self.pool.page_size, len(a.keys), self._shareable_pages(a.seq))
            if done > a.registered:
                self.pool.register(a.pages[a.registered : done], a.keys[a.registered : done])
                a.registered = done

    def _seed(self, a: _Active) -> None:
        """A request starts: its generator (when seeded) and its logits-processing state."""
        req, device = a.req, self.model.embed.device
        if req.seed is not None and req.temperature > 0:
            a.generator = torch.Generator(device=device).manual_seed(req.seed)
        vocab = self.model.cfg.vocab_size
        a.proc = row_logits(req.processing, req.prompt, req.stop_ids, vocab, device, req.temperature)

    def _prefill(self, a: _Active, stop: int) -> None:
        """Prefill prompt tokens ``a.prefilled .. stop - 1`` into a's slot; at the prompt's end sample its first token."""
        req, device, seq = a.req, self.model.embed.device, a.seq
        if not a.resumed and a.generator is None:
            self._seed(a)
        n, start = len(seq), a.prefilled
        tokens = torch.tensor([seq[start:stop]], dtype=torch.long, device=device)  # (1, T)
        positions = torch.arange(start, stop, device=device).unsqueeze(0)  # (1, T)
        hidden = self.model(tokens, positions, self._cache, rows=self._rows([a.slot]))[0]  # (T, D)
        scored = req.prompt[start + 1 : stop + 1] if req.prompt_logprobs and not a.resumed else []
        if scored:  # position p's logits score prompt token p + 1
            logits = self.model.logits(hidden[: len(scored)])
            a.prompt_lps += token_logprobs(logits, scored, req.logprobs or 0)
        hidden = hidden[-1:]  # (1, D)
        self.counters["prefill_tokens"] += stop - start
        self._prefilled(a, stop)
        if stop < n:
            return
        a.pos = n
        if a.resumed:  # its pending token was sampled before the preemption
            self._activate(a)
            return
        if req.max_tokens == 0:  # only the prompt is scored
            with self._cond:
                self._prefilling.remove(a)
                self._release(a)
            self.counters["finished"] += 1
            if not req.cancelled:
                req.sink(Event((), "length", prompt_logprobs=tuple(a.prompt_lps)))
            return
        self._activate(a)
        logits = finite_logits(self.model.logits(hidden))  # checked before forking: a failure here is a's alone
        rows = [a, *self._fork(a)]  # the other choices of its group start from the same logits
        try:
            tokens, scored = self._sample(logits.repeat(len(rows), 1), rows)
            lps = self._logprobs(scored, rows, tokens)
        except Exception as exc:  # the forked choices fail with a (whose error _guarded reports)
            self._fail(rows[1:], exc)
            raise
        self._advance(rows, [[t] for t in tokens], lps)

    def _prefill_mtp(self, a: _Active, stop: int) -> None:
        """As ``_prefill``, through the speculative decoder (which also fills the MTP caches)."""
        if not a.resumed and a.generator is None:
            self._seed(a)
        seq = a.seq
        logits = self._spec.prefill([a.slot], [seq], a.prefilled, stop)  # (1, V) at the prompt's end
        self.counters["prefill_tokens"] += stop - a.prefilled
        self._prefilled(a, stop)
        if logits is None:
            return
        a.pos = len(seq)
        self._activate(a)
        if a.resumed:  # its pending token was sampled before the preemption
            self._spec.put(
                [a.slot], torch.tensor([a.pos], device=logits.device), torch.tensor([a.token], device=logits.device)
            )
            return
        (token,), _ = self._sample(logits, [a])
        self._spec.put(
            [a.slot], torch.tensor([a.pos], device=logits.device), torch.tensor([token], device=logits.device)
        )
        self._advance([a], [[token]])

    def _decode_mtp(self, rows: list[_Active]) -> None:
        rows = sorted(rows, key=lambda a: a.slot)
        device = self.model.embed.device
        pos = torch.tensor([a.pos for a in rows], dtype=torch.long, device=device)  # (B,) each newest token
        temperature = torch.tensor([a.req.temperature for a in rows], dtype=torch.float32, device=device)
        top_p = torch.tensor([a.req.top_p for a in rows], dtype=torch.float32, device=device)
        procs = [a.proc for a in rows]
        sampler = RowSampler(temperature, top_p, [a.generator for a in rows], self._shared_gen, procs)
        n_acc, bonus, drafts = self._spec.step([a.slot for a in rows], pos, sampler)
        self.counters["steps"] += 1
        self.peak_batch = max(self.peak_batch, len(rows))
        accepted, bonus, drafts = n_acc.tolist(), bonus.tolist(), drafts.tolist()
        self.counters["drafts"] += self.mtp * len(rows)
        self.counters["accepted_drafts"] += sum(accepted)
        for a in rows:
            a.pos += 1  # where the first new token goes
        self._advance(rows, [d[:n] + [b] for d, n, b in zip(drafts, accepted, bonus, strict=True)])

    def _decode(self, rows: list[_Active]) -> None:
        rows = sorted(rows, key=lambda a: a.slot)
        device = self.model.embed.device
        tokens = torch.tensor([a.token for a in rows], dtype=torch.long, device=device)  # (B,)
        positions = torch.tensor([a.pos for a in rows], dtype=torch.long, device=device)  # (B,)
        logits = self._graphs(tokens, positions, self._rows([a.slot for a in rows]))  # (B, V), replayed if captured
        self.counters["steps"] += 1
        self.peak_batch = max(self.peak_batch, len(rows))
        for a in rows:
            a.pos += 1
        tokens, scored = self._sample(logits, rows)
        self._advance(rows, [[t] for t in tokens], self._logprobs(scored, rows, tokens))

    def _logprobs(self, logits: torch.Tensor, rows: list[_Active], tokens: list[int]) -> list[list[TokenLogprob]]:
        """Per row, the log-probability of its sampled token under ``logits`` (its penalized logits), if it asked."""
        out: list[list[TokenLogprob]] = [[] for _ in rows]
        for k in {a.req.logprobs for a in rows if a.req.logprobs is not None}:
            idx = [i for i, a in enumerate(rows) if a.req.logprobs == k]
            lps = token_logprobs(logits[idx], [tokens[i] for i in idx], k)
            for i, lp in zip(idx, lps, strict=True):
                out[i] = [lp]
        return out

    def _sample(self, logits: torch.Tensor, rows: list[_Active]) -> tuple[list[int], torch.Tensor]:
        """logits (B, V) fp32 -> one token per row, and the penalized logits (B, V) its logprobs come from.

        Each row's logits processing first (rows without any: untouched); seeded rows draw alone with
        their own generator."""
        logits, device = finite_logits(logits), logits.device
        temperature = torch.tensor([a.req.temperature for a in rows], dtype=torch.float32, device=device)
        top_p = torch.tensor([a.req.top_p for a in rows], dtype=torch.float32, device=device)
        procs = [a.proc for a in rows]
        scored = penalize(logits, procs)
        drawn = truncate(scored, procs, temperature)
        generators = [a.generator for a in rows]
        tokens = sample_rows(self.model.ops.sample, drawn, temperature, top_p, generators, self._shared_gen)
        return tokens.tolist(), scored

    def _advance(
        self, rows: list[_Active], tokens: list[list[int]], logprobs: list[list[TokenLogprob]] | None = None
    ) -> None:
        """Hand each row its new tokens (one event per row), the first going at ``a.pos``; finish rows at a
        stop token, max_tokens or the end of the slot. ``a.pos`` ends at the newest token's position."""
        for j, (a, new) in enumerate(zip(rows, tokens, strict=True)):
            finish, sent = None, []
            for i, t in enumerate(new):
                if i:
                    a.pos += 1
                a.generated += 1
                a.token = t
                sent.append(t)
                a.output.append(t)
                if t in a.req.stop_ids:
                    finish = "stop"
                elif a.generated >= a.req.max_tokens or a.pos >= self.max_len:
                    finish = "length"
                if finish is not None:
                    break
            self.counters["tokens"] += len(sent)
            if a.proc is not None:
                a.proc.extend(sent)
            if not a.req.cancelled:
                lps = tuple(logprobs[j][: len(sent)]) if logprobs else ()
                first = a.generated == len(sent) and a.req.prompt_logprobs
                a.req.sink(
                    Event(tuple(sent), finish, logprobs=lps, prompt_logprobs=tuple(a.prompt_lps) if first else None)
                )
            if finish is not None:
                self.counters["finished"] += 1
                with self._cond:
                    self._release(a)

    def _fail_all(self, message: str) -> None:
        with self._cond:
            pending = [a.req for a in self._active.values()] + [a.req for a in self._prefilling]
            pending += [a.req for a in self._waiting]
            for a in list(self._prefilling) + list(self._active.values()):
                self._release(a)
            self._prefilling.clear()
            self._waiting.clear()
        for req in pending:
            if not req.cancelled:
                req.sink(Event(error=message))
