"""Measured on the embedded tiny model: per-rank cache bytes and bytes moved per MoE layer, tensor
parallelism against ``--dp-attention`` (DP attention + all-to-all expert parallelism).

    python scripts/dp_ep_measure.py                       # worlds 2 4, 8 requests, steps of 64 tokens
    python scripts/dp_ep_measure.py --worlds 2 4 --requests 8 --step-tokens 64 --dtype bfloat16

For each world size it launches torchrun (gloo, CPU) twice, TP and DP, and on every rank wraps
``torch.distributed``'s collectives to count the bytes each call sends to OTHER ranks:

- ``all_reduce`` of n bytes: ``2 (N - 1) / N x n`` (what a ring all-reduce sends per rank; gloo's
  algorithm may differ, the figure is the one scripts/dp_ep_traffic.py computes for 671B);
- ``all_to_all_single``: the input rows for other ranks (its own split excluded), exactly;
- ``all_gather`` of n bytes (DP's per-layer code exchange, TP's logits): ``(N - 1) x n``.

Bytes are attributed to the MoE layers when sent inside ``MoE.forward`` (TP: the layer's
all-reduce; DP: dispatch counts, rows, ids and weights, combine rows, the code exchange). A "step"
is one forward of ``--step-tokens`` tokens over all ranks together: TP runs every token on every
rank, DP gives each rank its share of the rows. Cache bytes: the tensors ``new_cache`` allocates on
the rank for ``Engine.generate`` of ``--requests`` concurrent requests (TP: every request on every
rank; DP: the rank's share). Prints a Markdown table (maximum over ranks); asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT_LEN = 16
NEW_TOKENS = 4


def _cache_bytes(cache) -> int:
    total = 0
    for layer in [*cache.main, *cache.mtp]:
        for value in vars(layer).values():
            tensors = value.values() if isinstance(value, dict) else [value]
            total += sum(t.numel() * t.element_size() for t in tensors if hasattr(t, "element_size"))
    return total


def worker(out_dir: str, dp: bool, requests: int, step_tokens: int, dtype: str) -> None:
    import dataclasses

    import torch
    import torch.distributed as dist

    import dsv3
    from dsv3.model import graph
    from dsv3.runtime.distributed import init_from_env
    from dsv3.runtime.engine import share

    par = init_from_env("gloo")
    if dp:
        par = dataclasses.replace(par, dp_attention=True)
    n, me = par.world_size, par.rank
    sent = {"moe": 0, "other": 0}
    where = ["other"]

    def count(kind: str, nbytes: float) -> None:
        sent[where[-1]] += nbytes

    real_ar, real_a2a, real_ag = dist.all_reduce, dist.all_to_all_single, dist.all_gather

    def all_reduce(t, *a, **k):
        count("all_reduce", 2 * (n - 1) / n * t.numel() * t.element_size())
        return real_ar(t, *a, **k)

    def all_to_all_single(out, inp, out_splits=None, in_splits=None, *a, **k):
        row = inp[0].numel() * inp.element_size() if inp.dim() > 1 and inp.shape[0] else inp.element_size()
        splits = in_splits if in_splits is not None else [inp.shape[0] // n] * n
        count("all_to_all", row * (sum(splits) - splits[me]))
        return real_a2a(out, inp, out_splits, in_splits, *a, **k)

    def all_gather(parts, t, *a, **k):
        count("all_gather", (n - 1) * t.numel() * t.element_size())
        return real_ag(parts, t, *a, **k)

    dist.all_reduce, dist.all_to_all_single, dist.all_gather = all_reduce, all_to_all_single, all_gather
    moe_forward = graph.MoE.forward

    def counted_forward(self, x):
        where.append("moe")
        try:
            return moe_forward(self, x)
        finally:
            where.pop()

    graph.MoE.forward = counted_forward
    try:
        engine = dsv3.load(None, dtype=dtype, progress=False, parallel=par)
        model = engine.model
        caches: list[int] = []
        new_cache = model.new_cache

        def spy(*a, **k):
            cache = new_cache(*a, **k)
            caches.append(_cache_bytes(cache))
            return cache

        model.new_cache = spy
        g = torch.Generator().manual_seed(0)
        vocab = model.cfg.vocab_size
        prompts = [torch.randint(2, vocab, (PROMPT_LEN,), generator=g).tolist() for _ in range(requests)]
        engine.generate(prompts, NEW_TOKENS, temperature=0.0)
        # one step of step_tokens tokens over all ranks: rows of 1 token each (a decode step's shape)
        lo, hi = share(step_tokens, me, n) if dp else (0, step_tokens)
        tokens = torch.randint(2, vocab, (step_tokens, 1), generator=g)[lo:hi]
        moe_layers = sum(isinstance(b.ffn, graph.MoE) for b in model.layers)
        sent.update(moe=0, other=0)
        with torch.inference_mode():
            model(tokens)
        result = {
            "cache_bytes": caches[0] if caches else 0,
            "moe_bytes_per_layer": sent["moe"] / moe_layers,
            "other_bytes": sent["other"],
            "moe_layers": moe_layers,
        }
        Path(out_dir, f"rank{me}.json").write_text(json.dumps(result))
    finally:
        par.close()


def launch(world: int, dp: bool, args) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}"]
        cmd += [__file__, "--worker", out, "--requests", str(args.requests), "--step-tokens", str(args.step_tokens)]
        cmd += ["--dtype", args.dtype] + (["--dp"] if dp else [])
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("WORLD_SIZE", None)
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
        return [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--requests", type=int, default=8, help="concurrent requests (cache)")
    ap.add_argument("--step-tokens", type=int, default=64, help="tokens in one step, all ranks (traffic)")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--dp", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.dp, args.requests, args.step_tokens, args.dtype)
        return
    print(
        f"Embedded tiny model, {args.dtype}; cache: {args.requests} requests x ({PROMPT_LEN} + {NEW_TOKENS}) "
        f"positions; traffic: one forward of {args.step_tokens} one-token rows over all ranks (max over ranks)."
    )
    print()
    print("| ranks | TP cache / rank | DP cache / rank | TP bytes / MoE layer / rank | DP bytes / MoE layer / rank |")
    print("|---|---|---|---|---|")
    for world in args.worlds:
        tp, dp = launch(world, False, args), launch(world, True, args)

        def top(runs, key):
            return max(r[key] for r in runs)

        print(
            f"| {world} | {top(tp, 'cache_bytes'):,} | {top(dp, 'cache_bytes'):,} "
            f"| {top(tp, 'moe_bytes_per_layer'):,.0f} | {top(dp, 'moe_bytes_per_layer'):,.0f} |"
        )


if __name__ == "__main__":
    main()
