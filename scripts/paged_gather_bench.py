"""Decode tokens/s over the paged latent cache against the contiguous strips it replaced, at a long context.

    python scripts/paged_gather_bench.py                       # mid config, batch 8, context 2048, fp32
    python scripts/paged_gather_bench.py --batch 8 --context 2048 --steps 16 --rounds 3
    python scripts/paged_gather_bench.py --backends cpu_ref,cpu --threads 1   # also the cpu backend's paged read

The same absorbed model (the random mid config of scripts/profile_decode.py: hidden 512, 8 layers,
32 experts top-4) decodes ``--steps`` greedy tokens per row after a ``--context``-token prefill, once
over contiguous ``(B, S, C)`` / ``(B, S, R)`` strips per layer (the layout before paging: each
attention call reads ``buf[rows, :s]``, a copy of the batch's cache) and once over the paged cache
(``Transformer.new_cache``: pages of 64 through a block table, read by the backend's
``mla_paged_attention``; cpu_ref's gathers the pages it needs inside the op, the cpu backend's reads them
in place). ``--backends``: the paged cache is run once per backend named (the same weights; what a
backend declines is cpu_ref's), the contiguous strips once (cpu_ref's ``mla_latent_attention``). Rounds
alternate the layouts in one process, so load drifts over all alike; the prefill is not timed. Prints
tokens/s per round and the median, with the load average. Asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time
from pathlib import Path

import torch

from dsv3.model.cache import ModelCache, contiguous_cache

ROOT = Path(__file__).resolve().parent.parent


def _profile_decode():
    spec = importlib.util.spec_from_file_location("profile_decode", ROOT / "scripts" / "profile_decode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _mid_model():
    return _profile_decode()._model("mid", None)


def _same_model_on(model, backend: str):
    """``model``'s graph and weights with the operators of ``backend`` (cpu_ref filling what it declines)."""
    from dsv3.model.config import config_from_dict
    from dsv3.runtime.loading import build_model

    other = build_model(config_from_dict(_profile_decode().MID), backend=backend, dtype=model.embed.dtype)
    other.load_state_dict(model.state_dict())
    with torch.no_grad():  # non-persistent buffers too (the rotary tables): the mid model randomizes them
        theirs = dict(model.named_buffers())
        for name, buf in other.named_buffers():
            buf.copy_(theirs[name])
    if hasattr(other, "prepare_layouts"):
        other.prepare_layouts()
    return other.eval()


def decode_rate(model, cache: ModelCache, prompts: torch.Tensor, steps: int) -> tuple[float, list[int]]:
    """Prefill ``prompts (B, S)``, then ``steps`` greedy decode steps: (tokens/s of the steps, row 0's tokens)."""
    b, s = prompts.shape
    hidden = model(prompts, torch.arange(s).expand(b, s), cache)
    token = model.logits(hidden[:, -1]).argmax(-1)
    out = []
    start = time.perf_counter()
    for i in range(steps):
        pos = torch.full((b, 1), s + i)
        token = model.logits(model(token.unsqueeze(1), pos, cache)[:, 0]).argmax(-1)
        out.append(int(token[0]))
    return b * steps / (time.perf_counter() - start), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    ap.add_argument("--backends", default="cpu_ref", help="comma-separated backends for the paged cache")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = _mid_model()
    models = {"contiguous": model}
    for name in args.backends.split(","):
        models["paged" if name == "cpu_ref" else f"paged:{name}"] = (
            model if name == "cpu_ref" else _same_model_on(model, name)
        )
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, model.cfg.vocab_size, (args.batch, args.context), generator=g)
    length = args.context + args.steps
    print(f"load average {os.getloadavg()}, torch threads {torch.get_num_threads()}")
    print(f"mid config fp32, batch {args.batch}, context {args.context}, {args.steps} decode steps per round")
    rates: dict[str, list[float]] = {layout: [] for layout in models}
    tokens: dict[str, list[int]] = {}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for layout, m in models.items():
                cache = (
                    contiguous_cache(m, args.batch, length)
                    if layout == "contiguous"
                    else m.new_cache(args.batch, length)
                )
                rate, tokens[layout] = decode_rate(m, cache, prompts, args.steps)
                rates[layout].append(rate)
                print(f"  {layout:12s} {rate:8.1f} tok/s")
    for layout, r in rates.items():
        print(f"{layout:12s} median {statistics.median(r):8.1f} tok/s  (rounds: {', '.join(f'{x:.1f}' for x in r)})")
    for layout in models:
        if layout != "contiguous":
            print(f"same greedy tokens as contiguous, {layout}: {tokens['contiguous'] == tokens[layout]}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
