"""Per-rank cache bytes and bytes moved per MoE layer: tensor parallelism against DP attention + expert parallelism.

Computed from a config (no weights, no processes), for the 671B shape by default:

    python scripts/dp_ep_traffic.py                                  # worlds 8 16 32, 256 requests x 4096
    python scripts/dp_ep_traffic.py --worlds 8 16 32 --requests 256 --context 4096 --step-tokens 256

Cache: the absorbed form keeps one latent "head" per token per layer (kv_lora_rank + qk_rope_head_dim
values, main layers and MTP layers), which tensor parallelism cannot split: every rank holds every
request's cache. With DP attention each rank holds only its own requests' (1/world of them).

Traffic of one MoE layer in one step of ``--step-tokens`` tokens (the whole batch, all ranks):
- TP: the layer's output is all-reduced, every rank holding all tokens' hidden states (T x D, BF16);
  a ring all-reduce sends ``2 (N - 1) / N x T x D x 2`` bytes per rank.
- DP attention + EP: each rank holds T / N tokens; dispatch sends each token once to every other rank
  owning one of its k experts, combine sends the weighted results back (D values each way; dispatch in
  FP8 with a float32 scale per 128 values as DeepEP does, or BF16; combine in BF16). The number of
  distinct ranks a token's k experts live on is the expectation under uniform routing over E experts
  spread evenly over N ranks: ``N (1 - C(E - E/N, k) / C(E, k))``. DeepSeek-V3's group-limited routing
  (top-``topk_group`` of ``n_group`` groups) can only lower it when groups map onto ranks, so this is
  an upper estimate. Prints Markdown tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
from math import comb
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def distinct_ranks(experts: int, k: int, world: int) -> float:
    """Expected number of ranks holding at least one of a token's k distinct experts (uniform routing)."""
    per = experts // world
    return world * (1 - comb(experts - per, k) / comb(experts, k))


def tables(cfg: dict, worlds: list[int], requests: int, context: int, step_tokens: int) -> str:
    d, e, k = cfg["hidden_size"], cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    layers = cfg["num_hidden_layers"] + cfg.get("num_nextn_predict_layers", 0)
    per_token = (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 2 * layers  # BF16 latent cache, all layers
    out = [
        f"Cache: {per_token:,} bytes per token (BF16, {layers} layers incl. MTP); "
        f"{requests} requests x {context} positions.",
        "",
        "| ranks | TP: cache per rank | DP attention: cache per rank |",
        "|---|---|---|",
    ]
    total = requests * context * per_token
    for n in worlds:
        out.append(f"| {n} | {total / 2**30:.1f} GiB | {total / n / 2**30:.2f} GiB |")
    out += [
        "",
        f"One MoE layer, one step of {step_tokens} tokens (all ranks together), bytes sent per rank:",
        "",
        "| ranks | TP all-reduce (BF16) | EP distinct remote ranks / token | EP dispatch FP8 + combine BF16 "
        "| EP dispatch + combine BF16 |",
        "|---|---|---|---|---|",
    ]
    for n in worlds:
        allreduce = 2 * (n - 1) / n * step_tokens * d * 2
        remote = distinct_ranks(e, k, n) * (n - 1) / n  # a token's own rank costs nothing
        mine = step_tokens / n
        fp8 = mine * remote * (d + d // 128 * 4) + mine * remote * d * 2
        bf16 = mine * remote * d * 2 * 2
        out.append(
            f"| {n} | {allreduce / 2**20:.2f} MiB | {remote:.2f} | {fp8 / 2**20:.2f} MiB | {bf16 / 2**20:.2f} MiB |"
        )
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=ROOT / "configs" / "deepseek-v3-671b.json")
    ap.add_argument("--worlds", type=int, nargs="+", default=[8, 16, 32])
    ap.add_argument("--requests", type=int, default=256, help="concurrent requests (cache)")
    ap.add_argument("--context", type=int, default=4096, help="positions per request (cache)")
    ap.add_argument("--step-tokens", type=int, default=256, help="tokens in one step, all ranks (traffic)")
    args = ap.parse_args()
    cfg = json.loads(args.config.read_text())
    print(tables(cfg, args.worlds, args.requests, args.context, args.step_tokens))


if __name__ == "__main__":
    main()
