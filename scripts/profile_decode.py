"""ATen calls and wall time of one batch-1 decode step on cpu_ref, optionally against another dsv3 checkout.

    python scripts/profile_decode.py                      # the embedded model (bfloat16 as shipped)
    python scripts/profile_decode.py --model mid          # random hidden 512, 8 layers, 32 experts top-4, fp32
    python scripts/profile_decode.py --model mid --against /tmp/oldpkg --rounds 5

One decode step is ``Transformer.forward`` of one token after an 8-token prefill (no output head, no
sampling), counted with torch.profiler by ``dsv3/tools/decode_profile.py`` (loaded from this
checkout's file, so it measures an older dsv3 the same way). ``--against DIR``: DIR is a PYTHONPATH
under which ``import dsv3`` is the other checkout; the two run in alternating subprocesses
(``--rounds`` each), so machine load drifts over both alike; ms/step is the median over the rounds
of each round's median step. One thread (``torch.set_num_threads(1)``). Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: The mid-size random config of issue 22 (hidden 512, 8 layers, 32 experts top-4), float32.
MID = dict(
    model_type="deepseek_v3",
    vocab_size=16384,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=256,
    num_hidden_layers=8,
    first_k_dense_replace=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=256,
    kv_lora_rank=128,
    qk_nope_head_dim=64,
    qk_rope_head_dim=32,
    v_head_dim=64,
    n_routed_experts=32,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    routed_scaling_factor=2.5,
    norm_topk_prob=True,
    scoring_func="sigmoid",
    topk_method="noaux_tc",
    max_position_embeddings=4096,
    rope_theta=10000.0,
    num_nextn_predict_layers=0,
)


def _profiler():
    spec = importlib.util.spec_from_file_location("decode_profile", ROOT / "core" / "tools" / "decode_profile.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def _model(name: str, dtype: str | None):
    import torch

    import dsv3
    from dsv3.model.config import config_from_dict
    from dsv3.runtime.loading import build_model

    if name == "embedded":
        return dsv3.load(dtype=dtype or "bfloat16", progress=False).model
    model = build_model(config_from_dict(MID), dtype=dtype or "float32")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in list(model.parameters()) + list(model.buffers()):
            if p.dtype.is_floating_point and p.numel() > 1:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.02)
        for mod in model.modules():
            if type(mod).__name__ == "RMSNorm":
                mod.weight.fill_(1.0)
    if hasattr(model, "prepare_layouts"):
        model.prepare_layouts()
    return model.eval()


def worker(args) -> None:
    import torch

    torch.set_num_threads(1)
    import dsv3

    prof = _profiler().profile_decode_step(_model(args.model, args.dtype), timed_steps=args.steps)
    top = prof.calls.most_common(args.top)
    print(
        json.dumps(
            dict(
                dsv3=str(Path(dsv3.__file__).resolve().parent),
                per_layer=prof.per_layer,
                events_per_layer=prof.events_per_layer,
                total=prof.total,
                syncs=prof.syncs,
                step_ms=prof.step_ms,
                top=top,
            )
        )
    )


def _run(pythonpath: str | None, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, __file__, "--worker", "--model", args.model, "--steps", str(args.steps), "--top", "12"]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=("embedded", "mid"), default="embedded")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 for the embedded model, float32 for mid")
    ap.add_argument("--against", default=None, help="PYTHONPATH of the other dsv3 checkout")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=30, help="timed decode steps per round")
    ap.add_argument("--top", type=int, default=12)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    print(f"load: {os.getloadavg()}")
    sides = {"this": os.environ.get("PYTHONPATH")}
    if args.against:
        sides = {"other": args.against, **sides}
    results: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(args.rounds):
        for name, path in sides.items():  # alternate: other, this, other, this ...
            results[name].append(_run(path, args))
    for name, runs in results.items():
        r = runs[-1]
        ms = statistics.median(x["step_ms"] for x in runs)
        print(f"\n{name}: {r['dsv3']}")
        print(
            f"  ATen calls per layer {r['per_layer']:.1f} top-level, {r['events_per_layer']:.1f} with nested "
            f"(step total {r['total']} top-level), host syncs {r['syncs']}"
        )
        print(f"  ms/step (median of {len(runs)} rounds): {ms:.3f}   rounds: {[round(x['step_ms'], 3) for x in runs]}")
        print("  top ops: " + ", ".join(f"{n} {c}" for n, c in r["top"]))
    print(f"\nload: {os.getloadavg()}")


if __name__ == "__main__":
    main()
