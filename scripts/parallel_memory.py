"""Per-rank memory under tensor + expert parallelism: computed from a config, or measured on a checkpoint.

Computed (no weights needed): the model is built on the meta device for rank 0 of each world size,
exactly as ``dsv3.load`` builds it, and its tensors are summed, in BF16 and in the released FP8
layout (every attention/MLP/expert projection fp8 with one fp32 scale per 128x128 block; embeddings,
heads, norms, router gates and the MTP ``eh_proj`` in BF16). The MTP layer's embedding and head are
counted once (the loader shares them with the main ones when equal, as in the release). Also: the
dequantized ``wkv_b`` that the absorbed attention keeps for an fp8 checkpoint, and the cache bytes per
token per rank (absorbed latent cache: replicated; naive per-head K/V cache: split by heads).

    python scripts/parallel_memory.py                         # table for configs/*.json, ws 1 8 16 32
    python scripts/parallel_memory.py --config configs/deepseek-v3-671b.json --worlds 1 8 16 32 64

Measured (CPU, gloo): ``--measure CKPT`` runs ``torchrun --nproc-per-node N`` for every N in
``--worlds`` on this script; each rank records its resident memory (``/proc/self/status``) after
start-up, after loading its shard and after a short generation, and its model tensor bytes.
``--make-small DIR`` first writes a synthetic checkpoint (random weights, ~0.4 GB BF16, plus its FP8
copy in ``DIR-fp8``) whose weights dwarf the runtime.

    python scripts/parallel_memory.py --make-small /tmp/small --measure /tmp/small /tmp/small-fp8 --worlds 1 2 4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ("deepseek-v3-671b", "deepseek-v2-236b", "deepseek-v2-lite-16b")
SMALL = dict(  # the synthetic checkpoint of --make-small: per-rank splits stay on 128 blocks up to 4 ranks
    model_type="deepseek_v3",
    vocab_size=32000,
    hidden_size=1024,
    intermediate_size=4096,
    moe_intermediate_size=512,
    num_hidden_layers=4,
    num_nextn_predict_layers=1,
    num_attention_heads=16,
    n_shared_experts=1,
    n_routed_experts=16,
    num_experts_per_tok=4,
    n_group=4,
    topk_group=2,
    first_k_dense_replace=1,
    q_lora_rank=512,
    kv_lora_rank=256,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    max_position_embeddings=4096,
    bos_token_id=0,
    eos_token_id=1,
)


# ------------------------------------------------------------------ computed
def tensor_bytes(model: torch.nn.Module, skip_mtp_copies: bool = False) -> int:
    """Bytes of the model's distinct tensors (parameters and buffers, meta tensors included)."""
    seen, total = set(), 0
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(t) in seen or (skip_mtp_copies and name.startswith("mtp.") and name.endswith(("embed", "head.weight"))):
            continue
        seen.add(id(t))
        total += t.numel() * t.element_size()
    return total


def released_fmt_of(cfg):
    """fmt_of of the released FP8 layout (what ``dsv3 convert --to fp8`` writes)."""
    from dsv3.model.names import hf_name
    from dsv3.tools.convert import is_quantized_projection
    from dsv3.weights import FP8_BLOCK, HP

    return lambda path: FP8_BLOCK if is_quantized_projection(hf_name(path + ".weight", cfg)) else HP


def per_rank(cfg, world: int, fp8: bool) -> dict:
    """Rank 0's bytes at ``world`` ranks (all ranks hold the same amounts), or the reason it cannot split."""
    from dsv3.errors import Dsv3Error
    from dsv3.model.graph import MLA
    from dsv3.model.parallel import ParallelContext
    from dsv3.runtime.loading import build_model
    from dsv3.weights import FP8_BLOCK, HP

    fmt_of = released_fmt_of(cfg) if fp8 else None
    formats = (HP, FP8_BLOCK) if fp8 else (HP,)
    try:
        model = build_model(
            cfg,
            "cpu_ref",
            "bfloat16",
            formats=formats,
            fmt_of=fmt_of,
            device="meta",
            parallel=ParallelContext(0, world),
        )
    except Dsv3Error as exc:
        return {"error": str(exc)}
    attns = [m for m in model.modules() if isinstance(m, MLA)]
    absorbed = sum(
        a.n_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) * cfg.kv_lora_rank * 2 for a in attns if a.wkv_b.fmt != HP
    )

    def cache(form: str) -> int:
        total = 0
        for a in attns:
            a.attn_impl = form
            total += sum(torch.Size(s).numel() * 2 for s in a.cache_shapes().values())  # bf16 cache
        return total

    return {
        "weights": tensor_bytes(model, skip_mtp_copies=True),
        "absorbed_wkv_b": absorbed,
        "cache_absorb": cache("absorb"),
        "cache_naive": cache("naive"),
    }


def gib(n: int) -> str:
    return f"{n / 2**30:,.1f} GiB"


def kib(n: int) -> str:
    return f"{n / 2**10:,.1f} KiB"


def computed_table(config_paths: list[Path], worlds: list[int]) -> str:
    from dsv3.model.config import load_config

    lines = [
        "| config | ranks | BF16 weights / rank | FP8 weights / rank | + fp8 wkv_b for absorb | "
        "cache / token / rank (absorb) | cache / token / rank (naive) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    notes = []
    for path in config_paths:
        cfg = load_config(path)
        for world in worlds:
            bf, f8 = per_rank(cfg, world, fp8=False), per_rank(cfg, world, fp8=True)
            if "error" in bf:
                lines.append(f"| {path.stem} | {world} | impossible | impossible | | | |")
                notes.append(f"{path.stem} at {world} ranks: {bf['error']}")
                continue
            if "error" in f8:
                f8_cells = ["not on 128 blocks", ""]
                notes.append(f"{path.stem} at {world} ranks, FP8: {f8['error']}")
            else:
                f8_cells = [gib(f8["weights"]), gib(f8["absorbed_wkv_b"])]
            lines.append(
                f"| {path.stem} | {world} | {gib(bf['weights'])} | {f8_cells[0]} | {f8_cells[1]} | "
                f"{kib(bf['cache_absorb'])} | {kib(bf['cache_naive'])} |"
            )
    return "\n".join(lines + [""] + [f"- {n}" for n in notes])


# ------------------------------------------------------------------ measured
def status() -> dict[str, int]:
    """Resident-memory figures of this process from /proc/self/status, in bytes."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


def worker(ckpt: str, out_dir: str) -> None:
    """One rank: memory after start-up, after loading its shard, after generating 8 tokens."""
    import dsv3
    from dsv3.runtime.distributed import init_from_env

    par = init_from_env("gloo")
    try:
        before = status()
        engine = dsv3.load(ckpt, dtype="bfloat16", progress=False, parallel=par)
        gc.collect()
        loaded = status()
        engine.generate([[0, 5, 9, 12, 40, 41, 7]], max_new_tokens=8, temperature=0.0)
        record = {
            "world": par.world_size,
            "rank": par.rank,
            "tensor_bytes": tensor_bytes(engine.model),
            "start": before,
            "loaded": loaded,
            "generated": status(),
        }
        Path(out_dir, f"rank{par.rank}.json").write_text(json.dumps(record))
    finally:
        par.close()


def measure(ckpt: Path, worlds: list[int]) -> str:
    from dsv3.runtime.checkpoint import CheckpointFiles

    mib = lambda n: f"{n / 2**20:,.0f}"  # noqa: E731
    size = CheckpointFiles(ckpt).nbytes()
    lines = [
        f"checkpoint {ckpt} ({mib(size)} MiB of safetensors); MiB per rank (max over ranks):",
        "",
        "| ranks | model tensors | RSS at start (anon + file) | RSS after load (anon + file) | RSS after generate | peak RSS |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for n in worlds:
        with tempfile.TemporaryDirectory() as out:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
            cmd += [__file__, "--worker", str(ckpt), out]
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            subprocess.run(cmd, check=True, env=env, timeout=1800, stdout=subprocess.DEVNULL)
            ranks = [json.loads(Path(out, f"rank{r}.json").read_text()) for r in range(n)]

        def top(stage: str, key: str, ranks: list[dict] = ranks) -> int:
            return max(r[stage][key] for r in ranks)

        start = f"{mib(top('start', 'VmRSS'))} ({mib(top('start', 'RssAnon'))} + {mib(top('start', 'RssFile'))})"
        loaded = f"{mib(top('loaded', 'VmRSS'))} ({mib(top('loaded', 'RssAnon'))} + {mib(top('loaded', 'RssFile'))})"
        lines.append(
            f"| {n} | {mib(max(r['tensor_bytes'] for r in ranks))} | {start} | {loaded} | "
            f"{mib(top('generated', 'VmRSS'))} | {mib(top('generated', 'VmHWM'))} |"
        )
    return "\n".join(lines)


def make_small(path: Path) -> list[Path]:
    """Write a synthetic BF16 checkpoint (random weights, HF names) at ``path`` and its FP8 copy."""
    from safetensors.torch import save_file

    from dsv3.model.config import config_from_dict
    from dsv3.model.names import hf_name
    from dsv3.runtime.loading import build_model
    from dsv3.tools.convert import convert_checkpoint

    cfg = config_from_dict(SMALL)
    model = build_model(cfg, device="meta")
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for name, meta in [*model.named_parameters(), *model.named_buffers()]:
        if name.startswith("rope_"):
            continue
        hf = hf_name(name, cfg)
        names = [hf.format(e=e) for e in range(cfg.n_routed_experts)] if "{e}" in hf else [hf]
        shape = meta.shape[1:] if "{e}" in hf else meta.shape
        for n in names:
            if "norm" in name or name.endswith("gate_bias"):
                t = torch.ones(shape) if "norm" in name else torch.randn(shape, generator=g) * 0.1
            else:
                t = torch.randn(shape, generator=g) * shape[-1] ** -0.5
            tensors[n] = t.to(torch.float32 if name.endswith(("gate_weight", "gate_bias")) else torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(SMALL, indent=2) + "\n")
    fp8 = path.with_name(path.name + "-fp8")
    convert_checkpoint(path, fp8, "fp8", force=True, progress=False)
    return [path, fp8]


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", action="append", help="config file(s) (default: the published configs/*.json)")
    p.add_argument("--worlds", type=int, nargs="+", help="world sizes (default: 1 8 16 32, or 1 2 4 to measure)")
    p.add_argument("--make-small", type=Path, metavar="DIR", help="write a synthetic checkpoint (and DIR-fp8)")
    p.add_argument("--measure", type=Path, nargs="+", metavar="CKPT", help="measure these checkpoints")
    args = p.parse_args()
    if args.make_small:
        for made in make_small(args.make_small):
            print(f"wrote {made}", file=sys.stderr)
    if args.measure:
        for ckpt in args.measure:
            print(measure(ckpt, args.worlds or [1, 2, 4]) + "\n", flush=True)
        return
    if args.make_small:
        return
    configs = [Path(c) for c in args.config] if args.config else [REPO / "configs" / f"{c}.json" for c in CONFIGS]
    print(computed_table(configs, args.worlds or [1, 8, 16, 32]))


if __name__ == "__main__":
    main()
