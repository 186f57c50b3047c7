"""``dsv3 export onnx``: the model graph as ONNX for runtimes without a dsv3 plugin."""

from __future__ import annotations

import argparse
import sys

from ..errors import Dsv3Error
from ..tools.onnx_export import EXPORTERS


def add_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "export",
        help="export the model graph (onnx)",
        description="Export the model graph with its weights for runtimes that have no dsv3 backend plugin. One "
        "format so far: `dsv3 export onnx --out DIR` (needs the onnx extra: pip install 'dsv3[onnx]'; see "
        "docs/onnx.md). The export holds the main model only, not the MTP module.",
    )
    formats = p.add_subparsers(dest="format", required=True)
    o = formats.add_parser(
        "onnx",
        help="one step.onnx for prefill and decode, weights as external data",
        description=(
            "Write OUT/step.onnx: (tokens, positions, latent caches of every layer) -> (logits, updated caches), "
            "dynamic in batch, new tokens and cache length; weights in step.onnx.data; manifest.json, config and "
            "tokenizer beside it. Run it with `dsv3 run --backend onnxruntime --ckpt-path OUT`."
        ),
    )
    o.add_argument("--ckpt-path", help="high-precision checkpoint directory (default: the embedded model)")
    o.add_argument("--config", help="JSON or YAML config to use instead of the directory's config.json")
    o.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    o.add_argument("--opset", type=int, default=18, help="ONNX opset")
    o.add_argument("--dtype", choices=("float32", "float16"), default="float32", help="weights and activations")
    o.add_argument("--max-len", type=int, default=None, help="largest position + 1 (default max_position_embeddings)")
    o.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="torchscript",
        help="torchscript: torch.onnx's tracing exporter (seconds); dynamo: the torch.export-based one "
        "(needs onnxscript; slower)",
    )
    return p


def main(args) -> int:
    from ..backends.onnxruntime.plugin import unusable_reason

    if unusable_reason() is not None:
        raise Dsv3Error(f"cannot export to ONNX: {unusable_reason()}")
    if args.opset < 18:
        raise Dsv3Error(f"--opset {args.opset}: the exporter writes opset 18 or newer")
    from ..tools.onnx_export import export_onnx

    r = export_onnx(args.ckpt_path, args.out, args.opset, args.dtype, args.max_len, args.config, args.exporter)
    print(f"dsv3: wrote {r.out} (step.onnx + data {r.nbytes / 1e6:.1f} MB) in {r.seconds:.1f} s", file=sys.stderr)
    return 0
