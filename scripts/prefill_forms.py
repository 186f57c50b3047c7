#!/usr/bin/env python3
"""Prefill time of the absorbed MLA form with and without its naive-form prefill (an A/B on one checkpoint).

    python scripts/prefill_forms.py --ckpt-path DIR --prompt-lens 64,256,1024 [--dtype float32] [--threads 1]

Per prompt length: one forward over the prompt into a fresh cache plus the last position's logits,
median of --repeats, once with the latent attention for every token (``set_naive_prefill(False)``)
and once with the default naive-form prefill; prints both times, the speedup and the largest
relative difference of the last logits (the two paths sum in a different order).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import dsv3


def prefill_ms(model, tokens: torch.Tensor, repeats: int) -> tuple[float, torch.Tensor]:
    """Median milliseconds of a prefill of tokens (1, T) into a fresh cache, and its last logits (1, V)."""
    times, logits = [], None
    with torch.inference_mode():
        for _ in range(repeats):
            cache = model.new_cache(1, tokens.shape[1] + 1)
            start = time.perf_counter()
            logits = model.logits(model(tokens, None, cache)[:, -1])
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), logits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt-path", default=None, help="checkpoint directory (default: the embedded model)")
    parser.add_argument("--prompt-lens", default="64,256,1024")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--backend", default="cpu_ref")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    engine = dsv3.load(args.ckpt_path, args.backend, dtype=args.dtype, progress=False)
    model = engine.model
    print("prompt  latent ms  naive-form ms  speedup  last-logit rel diff")
    for n in (int(x) for x in args.prompt_lens.split(",")):
        tokens = torch.randint(2, engine.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(0))
        tokens = tokens.to(model.embed.device)
        model.set_naive_prefill(False)
        prefill_ms(model, tokens, 1)  # warm-up
        latent_ms, latent = prefill_ms(model, tokens, args.repeats)
        model.set_naive_prefill(True)
        naive_ms, naive = prefill_ms(model, tokens, args.repeats)
        diff = float((naive - latent).abs().max()) / float(latent.abs().max())
        print(f"{n:>6}  {latent_ms:>9.0f}  {naive_ms:>13.0f}  {latent_ms / naive_ms:>6.2f}x  {diff:.2e}", flush=True)


if __name__ == "__main__":
    main()
