"""Benchmark MTP speculative decoding against plain decoding on any checkpoint, side by side.

For each setting (no MTP, then --mtp K for every K asked), in the same process and on the same
prompts: end-to-end tokens/s, decode tokens/s (time to first token subtracted), speed-up over no
MTP, acceptance rate per draft position and mean tokens per main-model forward. Greedy by
default, where the outputs are compared with no MTP's (in float32 they must be identical; in
bf16 the verify forward's different shapes can flip a near-tie, which is reported, not hidden).

    python scripts/mtp_bench.py --ckpt-path DIR [--ks 1,2] [--max-new-tokens 128] [--batch 1]
    python scripts/mtp_bench.py --backend nvidia --dtype bfloat16 --json out.json

Without --ckpt-path the embedded model is used. Prompts: --prompt (repeatable), --input-file
(one per line), or a built-in set (token ids drawn at random when the checkpoint has no tokenizer).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

import dsv3
from dsv3.errors import Dsv3Error

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "def fibonacci(n):",
    "The three primary colors are",
    "In 1969, astronauts",
    "To make a cup of tea, first",
    "The quick brown fox",
    "Water boils at",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-path", help="checkpoint directory (default: the embedded model)")
    p.add_argument("--backend", default="cpu_ref")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"))
    p.add_argument("--attn-impl", default="absorb", choices=("absorb", "naive"))
    p.add_argument("--ks", default="1,2", help="comma-separated draft counts to compare with no MTP")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch", type=int, default=1, help="prompts per generate call")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per setting (the fastest is kept)")
    p.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    p.add_argument("--input-file", help="one prompt per line")
    p.add_argument("--json", help="also write the results to this JSON file")
    return p.parse_args(argv)


def load_prompts(args, engine) -> list:
    if args.input_file:
        with open(args.input_file) as f:
            texts = [line.strip() for line in f if line.strip()]
    else:
        texts = args.prompt or DEFAULT_PROMPTS
    if engine.tokenizer is not None:
        return texts
    g = torch.Generator().manual_seed(args.seed)  # no tokenizer: random token ids of similar lengths
    vocab = engine.cfg.vocab_size
    return [torch.randint(2, vocab, (4 + len(t) // 4,), generator=g).tolist() for t in texts]


def timed(engine, prompts, args, max_new: int, k: int):
    """Best-of-repeats wall time and the results of the last run."""
    best, results = float("inf"), None
    for _ in range(args.repeats):
        start = time.perf_counter()
        results = engine.generate(prompts, max_new, args.temperature, args.top_p, args.seed, mtp=k)
        best = min(best, time.perf_counter() - start)
    return best, results


def bench(engine, prompts: list, args, k: int) -> dict:
    """One setting over every batch of prompts: totals and per-position acceptance."""
    total_s = ttft_s = 0.0
    tokens = rows = steps = 0
    verified = 0.0
    accepted = [0] * k
    outputs = []
    for i in range(0, len(prompts), args.batch):
        batch = prompts[i : i + args.batch]
        ttft, _ = timed(engine, batch, args, 1, 0)  # prefill + first token, the same for every setting
        elapsed, results = timed(engine, batch, args, args.max_new_tokens, k)
        total_s += elapsed
        ttft_s += ttft
        rows += len(batch)
        tokens += sum(len(r.token_ids) for r in results)
        outputs += [r.token_ids for r in results]
        for r in results:
            if r.mtp:
                steps += r.mtp["steps"]
                verified += r.mtp["tokens_per_forward"] * r.mtp["steps"]
                accepted = [a + b for a, b in zip(accepted, r.mtp["accepted"], strict=True)]
    decode_s = max(total_s - ttft_s, 1e-9)
    return {
        "mtp": k,
        "tokens": tokens,
        "seconds": round(total_s, 4),
        "tokens_per_s": round(tokens / max(total_s, 1e-9), 2),
        "decode_tokens_per_s": round((tokens - rows) / decode_s, 2),
        "acceptance_rate": [round(a / steps, 4) for a in accepted] if steps else [],
        "tokens_per_forward": round(verified / steps, 4) if steps else 1.0,
        "outputs": outputs,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ks = [int(k) for k in args.ks.split(",") if k.strip()]
    try:
        engine = dsv3.load(args.ckpt_path, args.backend, args.dtype, args.attn_impl)
        if ks and not len(engine.model.mtp):
            raise Dsv3Error("checkpoint has no MTP layers (num_nextn_predict_layers=0)")
        prompts = load_prompts(args, engine)
        engine.generate(prompts[: args.batch], 4, args.temperature, args.top_p, args.seed)  # warm-up
        rows = [bench(engine, prompts, args, k) for k in [0, *ks]]
    except Dsv3Error as exc:
        print(f"mtp_bench: error: {exc}", file=sys.stderr)
        return 2
    base = rows[0]
    print(
        f"# {engine.path} backend={args.backend} dtype={args.dtype} attn={args.attn_impl} "
        f"batch={args.batch} prompts={len(prompts)} max_new_tokens={args.max_new_tokens} "
        f"temperature={args.temperature}"
    )
    print(f"{'mtp':>4} {'tok/s':>9} {'decode tok/s':>13} {'speed-up':>9} {'tok/fwd':>8}  acceptance per position")
    for r in rows:
        r["decode_speedup"] = round(r["decode_tokens_per_s"] / max(base["decode_tokens_per_s"], 1e-9), 3)
        same = ""
        if args.temperature == 0 and r["mtp"]:
            differ = sum(o != b for o, b in zip(r["outputs"], base["outputs"], strict=True))
            same = f"  outputs: {'identical' if not differ else f'{differ} of {len(prompts)} differ'}"
        acc = " ".join(f"{a:.3f}" for a in r["acceptance_rate"]) or "-"
        print(
            f"{r['mtp']:>4} {r['tokens_per_s']:>9.1f} {r['decode_tokens_per_s']:>13.1f} "
            f"{r['decode_speedup']:>8.2f}x {r['tokens_per_forward']:>8.2f}  {acc}{same}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"args": vars(args), "results": [{k: v for k, v in r.items() if k != "outputs"} for r in rows]},
                f,
                indent=2,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
