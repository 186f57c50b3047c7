"""Per-linear and per-layer error of --act-quant dynamic against none, for FP8 and INT8 checkpoints.

Per linear: the inputs each quantized projection sees in a ``--act-quant none`` forward are
captured, and the projection is applied to those same inputs both ways (weights dequantized vs.
activations quantized: fp8 per token per 128 channels, int8 per token), so each row is the error
of that one GEMM alone. Routed experts are evaluated on the tokens routed to them, all experts of
a layer in one row. Per layer: the hidden state after each decoder layer (and the logits) of a
full dynamic forward against a full none forward: the accumulated error.

    python scripts/quant_error_table.py                     # tiny random model, fp8 and int8
    python scripts/quant_error_table.py --ckpt-path DIR     # a quantized checkpoint (fp8 or int8)

Without --ckpt-path a random BF16 checkpoint is made with transformers (hidden 160, dims not
multiples of 128, init std 0.02) and converted with ``dsv3 convert``. In the
absorbed attention (the default) wkv_b is applied through its dequantized copy, so it has no row
there; ``--attn-impl naive`` shows it.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

import dsv3
from dsv3.backends.cpu_ref.quant import linear_for
from dsv3.model.graph import Linear, MoE
from dsv3.tools.convert import convert_checkpoint
from dsv3.weights import HP, Weight

SHAPES = dict(
    vocab_size=96,
    hidden_size=160,
    intermediate_size=288,
    moe_intermediate_size=136,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    n_shared_experts=1,
    n_routed_experts=8,
    num_experts_per_tok=3,
    n_group=2,
    topk_group=1,
    first_k_dense_replace=1,
    q_lora_rank=144,
    kv_lora_rank=136,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    max_position_embeddings=128,
    initializer_range=0.02,
)


def make_random_checkpoint(path: Path, seed: int = 0) -> Path:
    """A random BF16 DeepseekV3ForCausalLM checkpoint (transformers) with a non-zero routing bias."""
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**SHAPES)).eval()
    with torch.no_grad():
        for mod in model.modules():
            if hasattr(mod, "e_score_correction_bias"):
                mod.e_score_correction_bias.normal_(0.0, 0.3)
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def _errors(y_dyn: torch.Tensor, y_none: torch.Tensor) -> tuple[float, float, float]:
    """(max |diff|, max |diff| / max |ref|, ||diff|| / ||ref||)."""
    d = (y_dyn.float() - y_none.float()).abs()
    ref = y_none.float()
    return d.max().item(), (d.max() / ref.abs().max()).item(), (d.norm() / ref.norm()).item()


def per_linear(engine, tokens: torch.Tensor) -> list[tuple[str, str, int, float, float, float]]:
    """Rows (name, shape, n_rows, max abs, max rel, rel rms) for every quantized projection."""
    model = engine.model
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, Linear) and mod.fmt != HP:
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: captured.setdefault(n, []).append(i[0])))
        if isinstance(mod, MoE):
            hooks.append(mod.register_forward_hook(lambda m, i, o, n=name: captured.setdefault(n, []).append(i[0])))
    with torch.inference_mode():
        hidden = model(tokens)
        if model.mtp:
            model.mtp_forward(0, hidden, tokens.roll(-1, dims=1), torch.arange(tokens.shape[1]).expand_as(tokens))
    for h in hooks:
        h.remove()
    rows = []
    mods = dict(model.named_modules())
    for name, inputs in captured.items():
        mod = mods[name]
        x = torch.cat([t.reshape(-1, t.shape[-1]) for t in inputs])
        if isinstance(mod, Linear):
            w = mod.as_weight()
            y_none, y_dyn = linear_for(w.fmt, "none")(x, w), linear_for(w.fmt, "dynamic")(x, w)
            shape = f"{w.out_features}x{w.in_features}"
            rows.append((name, shape, x.shape[0], *_errors(y_dyn, y_none)))
        else:
            rows.extend(_expert_rows(name, mod, x))
    return rows


def _expert_rows(name: str, moe: MoE, x: torch.Tensor):
    """Errors of the routed experts' w1, w3, w2, each on the tokens routed to that expert."""
    _, ids = moe._gate(x, moe.gate_weight, moe.gate_bias, moe.routing)
    pairs: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"w1": [], "w3": [], "w2": []}
    for e in torch.unique(ids).tolist():
        xe = x[(ids == e).any(dim=-1)]
        ws = {k: getattr(moe, k).as_weight() for k in ("w1", "w3", "w2")}
        one = {k: Weight(w.data[e], w.fmt, w.scale[e], w.block_size, w.scale_fmt) for k, w in ws.items()}
        fmt = one["w1"].fmt
        none, dyn = linear_for(fmt, "none"), linear_for(fmt, "dynamic")
        h = F.silu(none(xe, one["w1"])) * none(xe, one["w3"])
        for k, inp in (("w1", xe), ("w3", xe), ("w2", h)):
            pairs[k].append((dyn(inp, one[k]), none(inp, one[k])))
    rows = []
    for k, got in pairs.items():
        w = getattr(moe, k).weight
        y_dyn = torch.cat([a.reshape(-1) for a, _ in got])
        y_none = torch.cat([b.reshape(-1) for _, b in got])
        n = sum(a.shape[0] for a, _ in got)
        rows.append((f"{name}.{k} [{len(got)} experts]", f"{w.shape[-2]}x{w.shape[-1]}", n, *_errors(y_dyn, y_none)))
    return rows


def per_layer(path: Path, tokens: torch.Tensor, dtype: str, attn_impl: str):
    """Rows (layer, max abs, max rel, rel rms): dynamic against none, full forwards."""
    outs = {}
    for mode in ("none", "dynamic"):
        engine = dsv3.load(path, dtype=dtype, act_quant=mode, attn_impl=attn_impl, progress=False)
        seen: dict[str, torch.Tensor] = {}
        hooks = [
            layer.register_forward_hook(lambda m, i, o, n=f"layers.{j}", d=seen: d.__setitem__(n, o))
            for j, layer in enumerate(engine.model.layers)
        ]
        with torch.inference_mode():
            seen["logits"] = engine.model.logits(engine.model(tokens))
        for h in hooks:
            h.remove()
        outs[mode] = seen
    return [(k, *_errors(outs["dynamic"][k], outs["none"][k])) for k in outs["none"]]


def print_tables(path: Path, tokens: torch.Tensor, dtype: str, attn_impl: str) -> None:
    engine = dsv3.load(path, dtype=dtype, act_quant="none", attn_impl=attn_impl, progress=False)
    fmts = sorted({m.fmt for _, m in engine.model.named_modules() if isinstance(m, Linear)} - {HP})
    print(f"\n== {path} ({', '.join(fmts) or 'hp'}; compute {dtype}; attention {attn_impl}; {tokens.numel()} tokens)")
    print("per linear: the same inputs through --act-quant dynamic vs none")
    print(f"{'linear':44} {'shape':>9} {'rows':>5} {'max abs':>10} {'max rel':>9} {'rel rms':>9}")
    for name, shape, n, mx, rel, rms in per_linear(engine, tokens):
        print(f"{name:44} {shape:>9} {n:>5} {mx:>10.3e} {rel:>9.4f} {rms:>9.4f}")
    print("per layer: full forwards, dynamic vs none (accumulated)")
    print(f"{'output':44} {'':>9} {'':>5} {'max abs':>10} {'max rel':>9} {'rel rms':>9}")
    for name, mx, rel, rms in per_layer(path, tokens, dtype, attn_impl):
        print(f"{name:44} {'':>9} {'':>5} {mx:>10.3e} {rel:>9.4f} {rms:>9.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-path", help="a quantized checkpoint (default: make a tiny random one)")
    p.add_argument("--formats", default="fp8,int8", help="without --ckpt-path: conversions to show")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--attn-impl", default="absorb", choices=("absorb", "naive"))
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    if args.ckpt_path:
        cfg = dsv3.load(args.ckpt_path, dtype="float32", progress=False).cfg
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq), generator=g)
        print_tables(Path(args.ckpt_path), tokens, args.dtype, args.attn_impl)
        return
    tokens = torch.randint(0, SHAPES["vocab_size"], (args.batch, args.seq), generator=g)
    with tempfile.TemporaryDirectory() as tmp:
        src = make_random_checkpoint(Path(tmp) / "bf16", args.seed)
        for fmt in args.formats.split(","):
            out = convert_checkpoint(src, Path(tmp) / fmt, fmt, progress=False).out
            print_tables(out, tokens, args.dtype, args.attn_impl)


if __name__ == "__main__":
    main()
