"""``dsv3 parity``: the same tokens through two backends, compared layer by layer."""

from __future__ import annotations

import argparse
from pathlib import Path

from .. import registry
from ..errors import Dsv3Error
from ..model.graph import ATTN_IMPLS
from ..runtime.loading import DTYPES
from ..weights import ACT_QUANT_MODES


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "parity",
        help="compare two backends layer by layer on one checkpoint (exit 1 on a divergence)",
        description="Load the checkpoint once per backend, run the same tokens through both (one full-sequence "
        "forward), and report the max/mean difference of every layer's attention output, MoE/MLP output and "
        "block output, the final norm and the logits, naming the first place beyond tolerance.",
    )
    p.add_argument("--backend", required=True, help="backend to check (see `dsv3 backends`)")
    p.add_argument("--against", default=registry.REFERENCE, help="backend to compare with")
    p.add_argument("--ckpt-path", help="Hugging Face-format checkpoint directory (default: the embedded model)")
    p.add_argument("--config", help="JSON or YAML config to use instead of the directory's config.json")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="compute dtype")
    p.add_argument("--attn-impl", choices=ATTN_IMPLS, default="absorb", help="MLA form: latent cache or per-head K/V")
    p.add_argument(
        "--act-quant", choices=ACT_QUANT_MODES, default="none", help="quantize activations for quantized weights"
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="text to tokenize with the checkpoint's tokenizer")
    src.add_argument("--tokens", help="token ids, comma- or space-separated (default: 12 fixed ids)")
    p.add_argument("--rtol", type=float, help="tolerance per place (default: 1e-4 float32, 0.1 bfloat16)")
    p.add_argument("--json", metavar="FILE", help="also write the report as JSON to FILE")
    return p


def parse_tokens(text: str) -> list[int]:
    """``"1, 2 3"`` -> [1, 2, 3]; a clear error naming the bad item."""
    ids = []
    for item in text.replace(",", " ").split():
        try:
            ids.append(int(item))
        except ValueError:
            raise Dsv3Error(f"--tokens: {item!r} is not an integer token id") from None
    if not ids:
        raise Dsv3Error("--tokens: no token ids given")
    return ids


def main(args) -> int:
    from ..tools.output_files import write_atomically
    from ..tools.parity import run_parity

    if args.rtol is not None and not args.rtol > 0:
        raise Dsv3Error("--rtol must be positive")
    tokens = parse_tokens(args.tokens) if args.tokens is not None else None
    report = run_parity(
        args.ckpt_path,
        args.backend,
        args.against,
        tokens,
        args.prompt,
        args.dtype,
        args.attn_impl,
        args.act_quant,
        args.rtol,
        args.config,
    )
    print(report.format_table(), flush=True)
    if args.json:
        write_atomically(Path(args.json), report.to_json() + "\n")
    return 0 if report.ok else 1
