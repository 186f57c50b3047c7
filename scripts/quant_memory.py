"""Load time and resident memory of the same model in BF16, FP8 (block) and INT8 (W8A8), side by side.

A random mid-size DeepSeek-V3-architecture checkpoint is made with transformers in BF16 (default:
hidden 1024, 4 layers, first dense, 16 routed experts + 1 shared, vocab 16384), converted with
``dsv3 convert`` to fp8 and int8 (timed), then each is loaded in a fresh process (compute dtype
bfloat16, cpu_ref) that reports:

- load time of ``dsv3.load`` (dsv3 and torch already imported);
- RSS after load minus RSS before (``/proc/self/status`` VmRSS), and the peak (VmHWM) minus before;
- model tensor bytes (unique storages of parameters and buffers), and of the quantized linears
  alone, with their bytes per parameter (weights + scales over weight elements);
- after one forward: the dequantized ``wkv_b`` copies the absorbed MLA keeps (``MLA._absorbed``).

    python scripts/quant_memory.py [--dir /tmp/dsv3-quant-memory] [--hidden 1024 --layers 4 --experts 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def make_checkpoint(path: Path, hidden: int, layers: int, experts: int, vocab: int, seed: int = 0) -> None:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        moe_intermediate_size=hidden * 11 // 16,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_shared_experts=1,
        n_routed_experts=experts,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        q_lora_rank=hidden * 3 // 4,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        max_position_embeddings=4096,
        initializer_range=0.02,
    )
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(cfg).to(torch.bfloat16).eval()
    model.save_pretrained(path)


def measure(path: str, dtype: str) -> dict:
    """Run in a fresh process: load ``path`` and report time and memory."""
    import gc

    import dsv3
    from dsv3.model.graph import MLA, Linear
    from dsv3.weights import HP

    gc.collect()
    rss0 = _status("VmRSS")
    t0 = time.perf_counter()
    engine = dsv3.load(path, dtype=dtype, progress=False)
    load_s = time.perf_counter() - t0
    gc.collect()
    rss1, hwm = _status("VmRSS"), _status("VmHWM")
    model = engine.model
    storages = {}
    for t in list(model.parameters()) + list(model.buffers()):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    quant = [m for m in model.modules() if isinstance(m, Linear) and m.fmt != HP]
    q_bytes = sum(m.weight.nbytes + m.scale.nbytes for m in quant)
    q_params = sum(m.weight.numel() for m in quant)
    lin = [
        m
        for n, m in model.named_modules()
        if isinstance(m, Linear) and m.fmt == HP and n.split(".")[-1] not in ("head", "eh_proj")
    ]
    with torch.inference_mode():
        engine.logits(torch.randint(0, engine.cfg.vocab_size, (1, 8)))
    absorbed = sum(m._absorbed.nbytes for m in model.modules() if isinstance(m, MLA) and m._absorbed is not None)
    fmts = sorted({m.fmt for m in model.modules() if isinstance(m, Linear)})
    return {
        "load_s": load_s,
        "rss_delta": rss1 - rss0,
        "peak_delta": hwm - rss0,
        "tensor_bytes": sum(storages.values()),
        "quant_bytes": q_bytes,
        "quant_params": q_params,
        "hp_linear_bytes": sum(m.weight.nbytes for m in lin),
        "hp_linear_params": sum(m.weight.numel() for m in lin),
        "absorbed_bytes": absorbed,
        "formats": fmts,
    }


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/dsv3-quant-memory", help="where the three checkpoints are written")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--vocab", type=int, default=16384)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--measure", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.dtype)))
        return

    from dsv3.tools.convert import convert_checkpoint

    root = Path(args.dir)
    bf16 = root / "bf16"
    if not (bf16 / "config.json").exists():
        t = time.perf_counter()
        make_checkpoint(bf16, args.hidden, args.layers, args.experts, args.vocab)
        print(f"made {bf16} in {time.perf_counter() - t:.1f} s")
    paths = {"bf16": bf16}
    for fmt in ("fp8", "int8"):
        t = time.perf_counter()
        paths[fmt] = convert_checkpoint(bf16, root / fmt, fmt, force=True, progress=False).out
        dt = time.perf_counter() - t
        print(f"convert bf16 -> {fmt}: {dt:.2f} s ({_dir_bytes(bf16) / dt / 1e6:.0f} MB/s read)")

    rows = {}
    for name, path in paths.items():
        cmd = [sys.executable, __file__, "--measure", str(path), "--dtype", args.dtype]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=os.environ.copy()).stdout
        rows[name] = json.loads(out.strip().splitlines()[-1])

    mb = 1e6
    print(
        f"\nmodel: hidden {args.hidden}, {args.layers} layers, {args.experts} experts, vocab {args.vocab}; "
        f"compute {args.dtype}; cpu_ref; each loaded in a fresh process"
    )
    head = (
        "checkpoint",
        "disk MB",
        "load s",
        "RSS+ MB",
        "peak+ MB",
        "tensors MB",
        "qlinear MB",
        "B/param",
        "wkv_b cache MB",
    )
    print("{:<10} {:>8} {:>7} {:>8} {:>9} {:>10} {:>10} {:>8} {:>14}".format(*head))
    for name, r in rows.items():
        per = (
            r["quant_bytes"] / r["quant_params"] if r["quant_params"] else r["hp_linear_bytes"] / r["hp_linear_params"]
        )
        qmb = r["quant_bytes"] / mb if r["quant_params"] else r["hp_linear_bytes"] / mb
        print(
            f"{name:<10} {_dir_bytes(paths[name]) / mb:>8.1f} {r['load_s']:>7.2f} {r['rss_delta'] / mb:>8.1f} "
            f"{r['peak_delta'] / mb:>9.1f} {r['tensor_bytes'] / mb:>10.1f} {qmb:>10.1f} {per:>8.4f} "
            f"{r['absorbed_bytes'] / mb:>14.1f}"
        )
    print(
        "qlinear: the projections the formats quantize (for bf16: the same projections in bf16); "
        "B/param: their bytes per weight element, scales included."
    )


if __name__ == "__main__":
    main()
