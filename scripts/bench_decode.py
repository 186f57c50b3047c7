"""Decode speed and KV-cache size: dsv3 (absorbed and naive MLA) side by side with transformers.

Both run the same checkpoint in the same dtype, in the same process, the same way: prefill
equal-length prompts, then a timed loop of single-token greedy decode steps (forward one token per
row with the KV cache, take the last logits, argmax). Decode tokens/s = batch x steps / loop time;
each figure is the median of --reps timed runs after --warmup untimed ones. KV-cache bytes per
token are computed from the cache tensors each implementation actually holds after decoding
(transformers 5 caches the normalized latent and the roped key, not per-head K/V).

    python scripts/bench_decode.py --preset tiny --dtype float32
    python scripts/bench_decode.py --preset mid --dtype bfloat16 --batch 1 8
    python scripts/bench_decode.py --ckpt-path DIR   # an existing DeepseekV3ForCausalLM directory

--preset makes a random checkpoint with transformers' DeepseekV3ForCausalLM (tiny: configs/tiny-v3.yaml;
mid: hidden 1024, 8 layers, 64 routed experts) in a temporary directory. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import inspect
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

import dsv3

CONFIGS = Path(dsv3.__file__).resolve().parent.parent / "configs"

MID = dict(
    vocab_size=16384,
    hidden_size=1024,
    intermediate_size=2816,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    first_k_dense_replace=1,
    num_attention_heads=16,
    num_key_value_heads=16,
    q_lora_rank=384,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=64,
    num_experts_per_tok=6,
    n_group=8,
    topk_group=4,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    rope_theta=10000.0,
    rope_scaling={
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 1024,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    initializer_range=0.02,
    bos_token_id=0,
    eos_token_id=1,
)


def preset_config(name: str) -> dict:
    if name == "mid":
        return dict(MID)
    raw = yaml.safe_load((CONFIGS / "tiny-v3.yaml").read_text())
    drop = ("model_type", "architectures", "scoring_func", "topk_method", "num_nextn_predict_layers")
    return {k: v for k, v in raw.items() if k not in drop} | {"initializer_range": 0.1}


def make_checkpoint(kwargs: dict, path: Path, seed: int = 0) -> None:
    """A random DeepseekV3ForCausalLM (non-zero routing bias) saved with save_pretrained."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**kwargs)).float().eval()
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0.0, 0.3)
    model.save_pretrained(path)


# --------------------------------------------------------------------------- decode loops
@torch.inference_mode()
def dsv3_decode(engine, prompts: torch.Tensor, steps: int) -> tuple[float, list[list[int]], int]:
    """(seconds for ``steps`` decode steps, generated ids, KV bytes per token) for dsv3."""
    model = engine.model
    b, p = prompts.shape
    cache = model.new_cache(b, p + steps + 1)
    positions = torch.arange(p).expand(b, p)
    hidden = model(prompts, positions, cache)[:, -1]
    nxt = model.logits(hidden).argmax(-1)  # (B,)
    out = [nxt]
    pos = torch.full((b, 1), p)
    start = time.perf_counter()
    for _ in range(steps):
        hidden = model(nxt.unsqueeze(1), pos, cache)[:, 0]
        nxt = model.logits(hidden).argmax(-1)
        out.append(nxt)
        pos = pos + 1
    elapsed = time.perf_counter() - start
    return elapsed, torch.stack(out, 1).tolist(), cache.nbytes_per_token()


def _hf_cache_bytes(cache, batch: int) -> tuple[int, int]:
    """(total bytes, cached positions) over every tensor a transformers cache holds."""
    total, length = 0, 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
                length = max(length, t.shape[-2])
    if total == 0 and hasattr(cache, "key_cache"):  # older transformers
        for t in list(cache.key_cache) + list(cache.value_cache):
            total += t.numel() * t.element_size()
            length = max(length, t.shape[-2])
    return total, length


def _cache_of(out):
    return out.cache if hasattr(out, "cache") else out.past_key_values  # transformers 5 renamed it


@torch.inference_mode()
def hf_decode(model, prompts: torch.Tensor, steps: int) -> tuple[float, list[list[int]], int, str]:
    """(seconds, generated ids, KV bytes per token, what one layer's cache holds) for transformers."""
    out = model(input_ids=prompts, use_cache=True)
    cache = _cache_of(out)
    nxt = out.logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
    ids = [nxt[:, 0]]
    # transformers >= 5.x names the argument ``cache`` (``past_key_values`` is deprecated)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=nxt, use_cache=True, **{cache_kw: cache})
        cache = _cache_of(out)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        ids.append(nxt[:, 0])
    elapsed = time.perf_counter() - start
    total, length = _hf_cache_bytes(cache, prompts.shape[0])
    layer = cache.layers[0] if getattr(cache, "layers", None) else None
    shapes = "?"
    if layer is not None:
        shapes = f"keys {tuple(layer.keys.shape)} + values {tuple(layer.values.shape)} {layer.keys.dtype}"
    return elapsed, torch.stack(ids, 1).tolist(), total // max(prompts.shape[0] * length, 1), shapes


def _compare(ids: list[list[int]], ref: list[list[int]]) -> str:
    """'identical', or the first step where greedy decoding left transformers' path (per row)."""
    if ids == ref:
        return "identical"
    firsts = [
        next((i for i, (a, b) in enumerate(zip(x, y, strict=True)) if a != b), None)
        for x, y in zip(ids, ref, strict=True)
    ]
    diverged = [f for f in firsts if f is not None]
    return f"differ from step {min(diverged)} in {len(diverged)} of {len(ids)} row(s)"


def median_run(fn, warmup: int, reps: int):
    for _ in range(warmup):
        fn()
    runs = [fn() for _ in range(reps)]
    return statistics.median(r[0] for r in runs), runs[-1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--ckpt-path", help="an existing DeepseekV3ForCausalLM checkpoint directory")
    src.add_argument("--preset", choices=("tiny", "mid"), default="tiny")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per run")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--skip-naive", action="store_true", help="do not time dsv3's naive MLA")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    tmp = None
    path = Path(args.ckpt_path) if args.ckpt_path else None
    if path is None:
        tmp = tempfile.TemporaryDirectory(prefix="dsv3-bench-")
        path = Path(tmp.name) / args.preset
        t = time.perf_counter()
        make_checkpoint(preset_config(args.preset), path)
        print(f"made a random {args.preset} checkpoint in {time.perf_counter() - t:.1f} s", file=sys.stderr)

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    engines = {"dsv3 absorb": dsv3.load(path, dtype=args.dtype, attn_impl="absorb", progress=False)}
    if not args.skip_naive:
        engines["dsv3 naive"] = dsv3.load(path, dtype=args.dtype, attn_impl="naive", progress=False)
    cfg = engines["dsv3 absorb"].cfg
    n_params = sum(p.numel() for p in hf.parameters())
    print(
        f"# {path.name}: {n_params / 1e6:.1f}M parameters, hidden {cfg.hidden_size}, {cfg.num_hidden_layers} layers, "
        f"{cfg.n_routed_experts} experts (top {cfg.num_experts_per_tok}), {cfg.num_attention_heads} heads, "
        f"kv_lora {cfg.kv_lora_rank} + rope {cfg.qk_rope_head_dim}; dtype {args.dtype}; {args.threads} thread(s); "
        f"prompt {args.prompt_len}, {args.steps} decode steps, median of {args.reps} after {args.warmup} warm-up; "
        f"transformers attention: {hf.config._attn_implementation}"
    )
    print(
        f"{'impl':<14} {'batch':>5} {'decode tok/s':>13} {'ms/step':>9} {'KV bytes/token':>15}  greedy ids vs transformers"
    )
    g = torch.Generator().manual_seed(0)
    for b in args.batch:
        prompts = torch.randint(2, cfg.vocab_size, (b, args.prompt_len), generator=g)
        t_hf, (_, hf_ids, hf_bytes, hf_shapes) = median_run(
            lambda p=prompts: hf_decode(hf, p, args.steps), args.warmup, args.reps
        )
        rows = [("transformers", t_hf, hf_bytes, "-")]
        for name, engine in engines.items():
            t, (_, ids, kv_bytes) = median_run(
                lambda e=engine, p=prompts: dsv3_decode(e, p, args.steps), args.warmup, args.reps
            )
            rows.append((name, t, kv_bytes, _compare(ids, hf_ids)))
        for name, t, kv_bytes, same in rows:
            print(f"{name:<14} {b:>5} {b * args.steps / t:>13.1f} {1e3 * t / args.steps:>9.2f} {kv_bytes:>15}  {same}")
    print(f"# transformers cache, layer 0: {hf_shapes}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
