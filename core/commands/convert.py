"""``dsv3 convert``: rewrite a checkpoint in another weight format (FP8 <-> BF16, -> INT8)."""

from __future__ import annotations

import argparse
import sys

from ..tools.convert import DEFAULT_MAX_SHARD_SIZE, TARGETS, convert_checkpoint


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "convert",
        help="convert a checkpoint between weight formats (fp8, bf16, int8)",
        description=(
            "Convert a Hugging Face-format checkpoint shard by shard. Attention and MLP/expert projections "
            "are written in the target format; norms, embeddings, lm_head, the router gate and MTP eh_proj "
            "are copied unchanged. The output appears only once it is complete."
        ),
    )
    p.add_argument("--ckpt-path", required=True, help="input checkpoint directory (only read)")
    p.add_argument("--out", required=True, help="output directory (must not exist or be empty, unless --force)")
    p.add_argument(
        "--to",
        required=True,
        choices=list(TARGETS),
        help="bf16/fp16/fp32: dequantized; fp8: 128x128 block e4m3; int8: W8A8 per channel; int8-wo: weight-only",
    )
    p.add_argument("--scale-fmt", choices=("ue8m0",), help="fp8 only: power-of-two scales (DeepSeek-V3.1)")
    p.add_argument(
        "--max-shard-size",
        default=f"{DEFAULT_MAX_SHARD_SIZE // 10**9}GB",
        help="largest output shard, e.g. 5GB, 500MB, 2GiB",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="replace a non-empty --out that holds a checkpoint or an earlier dsv3 convert output, nothing else",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(args) -> int:
    result = convert_checkpoint(
        args.ckpt_path,
        args.out,
        args.to,
        scale_fmt=args.scale_fmt,
        max_shard_size=args.max_shard_size,
        force=args.force,
        progress=False if args.no_progress else None,
    )
    print(
        f"dsv3: wrote {result.out} ({len(result.files)} safetensors file(s), {result.nbytes / 1e6:.1f} MB, "
        f"{result.n_quantized} projection(s) as {args.to})",
        file=sys.stderr,
    )
    return 0
