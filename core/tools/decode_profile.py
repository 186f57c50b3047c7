"""ATen calls of one decode step: how many operator calls the model graph makes per token.

``profile_decode_step(model)`` prefills a short prompt into a fresh cache, then records one decode
forward (batch 1, one new token, ``Transformer.forward`` only: the output head and sampling are not
part of it) with ``torch.profiler`` and counts ``aten::`` events two ways: ``calls``, the top-level
ones (what the model graph and the operators' Python code call: ``F.linear`` is one), and ``events``,
nested ones included (``aten::linear`` is also its ``t``, ``transpose``, ``mm``... each a dispatch).
Host syncs are the events that copy a device value
to the host: ``aten::item``, ``aten::_local_scalar_dense`` (``int(t)``, ``bool(t)``, ``.tolist()``
all go through them).
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

import torch
from torch.profiler import ProfilerActivity, profile

#: Profiler events that read a tensor's value on the host (a device sync on an accelerator).
SYNC_OPS = ("aten::item", "aten::_local_scalar_dense")


@dataclass
class StepProfile:
    """One decode step: top-level ``calls`` and all ``events`` (ATen op name -> count), the layer count,
    the wall time of an unprofiled step."""

    calls: Counter
    events: Counter
    layers: int
    step_ms: float

    @property
    def total(self) -> int:
        return sum(self.calls.values())

    @property
    def per_layer(self) -> float:
        """Top-level ATen calls per decoder layer (the whole forward's, embedding and final norm included)."""
        return self.total / self.layers

    @property
    def events_per_layer(self) -> float:
        """ATen events per decoder layer, nested ones included."""
        return sum(self.events.values()) / self.layers

    @property
    def syncs(self) -> int:
        return sum(self.events[name] for name in SYNC_OPS)


def _decode_once(model, prompt_len: int, length_kw: bool):
    """A fresh cache holding a ``prompt_len``-token prefill, and a function running one decode forward."""
    device = model.embed.device
    cache = model.new_cache(1, prompt_len + 1)
    tokens = (torch.arange(prompt_len, device=device) % model.cfg.vocab_size).view(1, -1)
    model(tokens, torch.arange(prompt_len, device=device).view(1, -1), cache)
    token = torch.ones(1, 1, dtype=torch.long, device=device)
    pos = torch.full((1, 1), prompt_len, dtype=torch.long, device=device)
    kw = {"length": prompt_len + 1} if length_kw else {}
    return lambda: model(token, pos, cache, **kw)


@torch.inference_mode()
def profile_decode_step(model, prompt_len: int = 8, timed_steps: int = 20) -> StepProfile:
    """Count the ATen calls of one batch-1 decode step after a ``prompt_len``-token prefill.

    The step is the model forward of one token at position ``prompt_len`` over the cache, given its
    length on the host (``length=``) when the model's forward takes it. ``step_ms``: the median wall
    time of ``timed_steps`` unprofiled repeats of that same step (each rewrites the same cache slot).
    """
    import inspect

    length_kw = "length" in inspect.signature(model.forward).parameters
    step = _decode_once(model, prompt_len, length_kw)
    step()  # warm up (lazily prepared weights, allocator)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    aten = [e for e in prof.events() if e.name.startswith("aten::")]
    events = Counter(e.name for e in aten)
    calls = Counter(e.name for e in aten if e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    times = []
    for _ in range(timed_steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    return StepProfile(calls, events, model.cfg.num_hidden_layers, 1e3 * times[len(times) // 2])
