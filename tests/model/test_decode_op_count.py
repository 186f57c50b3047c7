"""One batch-1 decode step of the model graph on cpu_ref: how many ATen calls it makes, and no host sync.

Counted with torch.profiler by ``dsv3.tools.decode_profile`` on the tiny float32 checkpoint (3 layers,
the first dense, two MoE): top-level calls (what the graph and cpu_ref's Python code call) and all
ATen events (nested ones included), per layer (the whole forward divided by the layer count).
On this checkpoint the step before the lean one (commit 3f1ddfc) made 218 calls / 735 events per layer
and 14 host syncs (``.tolist()`` twice per MoE layer, two per paged attention, ``positions.max()``):
these tests failed on it by 58 calls, 235 events and 14 syncs. The lean step makes 144 / 457 (torch
2.13) with the experts gathered (an accelerator's path) and 166 calls with cpu_ref's grouped CPU path
(its per-expert calls depend on how many experts the token picks); the bounds sit ~10% above, so a
regression of a dozen calls per layer fails.
"""

from __future__ import annotations

import pytest

import dsv3
from dsv3.tools.decode_profile import SYNC_OPS, profile_decode_step

#: Top-level ATen calls per layer on this checkpoint (fp32, 3 layers): 144 with the experts gathered,
#: 166 with cpu_ref's grouped CPU path.
MAX_CALLS_PER_LAYER = 160
MAX_CALLS_PER_LAYER_CPU = 185
#: ATen events per layer, nested ones included: 457 gathered, 531 with the grouped CPU path.
MAX_EVENTS_PER_LAYER = 500
MAX_EVENTS_PER_LAYER_CPU = 585


@pytest.fixture(scope="module")
def profile(tiny_ckpt):
    model = dsv3.load(tiny_ckpt, dtype="float32", progress=False).model
    return profile_decode_step(model, prompt_len=8, timed_steps=1)


def _top(counter, n: int = 8) -> str:
    return ", ".join(f"{name} {c}" for name, c in counter.most_common(n))


def test_decode_step_makes_few_aten_calls_per_layer(profile):
    assert profile.per_layer <= MAX_CALLS_PER_LAYER_CPU, f"{profile.per_layer:.1f} calls/layer: {_top(profile.calls)}"
    assert profile.events_per_layer <= MAX_EVENTS_PER_LAYER_CPU, (
        f"{profile.events_per_layer:.1f} events per layer: {_top(profile.events)}"
    )


def test_decode_step_reads_nothing_back_to_the_host(tiny_ckpt, monkeypatch):
    """Given the cache length on the host (``length=``), the forward never copies a value off the device:
    the routed experts are gathered by id on the device, paged attention reads the block table's width.

    cpu_ref gathers the experts only on an accelerator (``moe.use_gathered``: on a CPU its grouped path,
    whose ``.tolist()`` costs nothing there, is faster), so the choice an accelerator makes is forced here.
    """
    import dsv3.backends.cpu_ref.moe as moe

    monkeypatch.setattr(moe, "use_gathered", lambda x, ids, experts: ids.numel() <= experts)
    model = dsv3.load(tiny_ckpt, dtype="float32", progress=False).model
    profile = profile_decode_step(model, prompt_len=8, timed_steps=1)
    syncs = {name: profile.events[name] for name in SYNC_OPS if profile.events[name]}
    assert not syncs, f"host syncs in the decode step: {syncs}"
    assert profile.per_layer <= MAX_CALLS_PER_LAYER, f"{profile.per_layer:.1f} calls/layer: {_top(profile.calls)}"
    assert profile.events_per_layer <= MAX_EVENTS_PER_LAYER, f"{profile.events_per_layer:.1f} events per layer"


def test_cpu_decode_step_syncs_only_for_the_grouped_experts(profile):
    """On a CPU the only host reads are the grouped expert path's two ``.tolist()`` per MoE layer."""
    moe_layers = 2  # the tiny checkpoint: 3 layers, the first dense
    syncs = sum(profile.events[name] for name in SYNC_OPS)
    assert syncs <= 2 * moe_layers, {name: profile.events[name] for name in SYNC_OPS if profile.events[name]}
