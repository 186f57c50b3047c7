"""Decode speed of the onnxruntime backend against cpu_ref (same checkpoint, float32, batch 1).

``python -m dsv3.backends.onnxruntime.bench [--ckpt-path DIR] [--onnx-dir DIR] [--tokens N] [--threads K]``
prints export time, file size and decode tokens/s of both, measured in the same run. Decode steps only:
the prompt's prefill is timed separately.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

import dsv3
from dsv3.tools.onnx_export import GRAPH_FILE, export_onnx

from .runner import OnnxModel


def _decode(model, cache, first: torch.Tensor, start: int, n: int) -> tuple[float, list[int]]:
    """Greedy-decode n tokens after ``first`` (1, 1) at position ``start`` -> (seconds, token ids)."""
    token, ids = first, []
    t0 = time.perf_counter()
    with torch.inference_mode():
        for i in range(n):
            logits = model.logits(model(token, torch.tensor([[start + i]]), cache))[:, -1]
            token = logits.argmax(-1, keepdim=True)
            ids.append(int(token))
    return time.perf_counter() - t0, ids


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt-path", default=None, help="checkpoint (default: the embedded model)")
    p.add_argument("--onnx-dir", default=None, help="an existing export of it (default: export into a temp dir)")
    p.add_argument("--tokens", type=int, default=64, help="decode steps to time")
    p.add_argument("--threads", type=int, default=None, help="threads for both (default: torch's and ORT's own)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    prompt = list(range(2, 34))  # 32 tokens
    ref = dsv3.load(args.ckpt_path, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.onnx_dir) if args.onnx_dir else Path(tmp) / "onnx"
        if not args.onnx_dir:
            r = export_onnx(args.ckpt_path, out)
            print(f"export: {r.seconds:.1f} s, step.onnx + data {r.nbytes / 1e6:.1f} MB")
        else:
            print(f"export dir: {out} ({sum(f.stat().st_size for f in out.glob(GRAPH_FILE + '*')) / 1e6:.1f} MB)")
        ort_model = OnnxModel(out, threads=args.threads)
        total = len(prompt) + args.tokens + 1
        results = {}
        for name, model in (("cpu_ref", ref.model), ("onnxruntime", ort_model)):
            cache = model.new_cache(1, total)
            t0 = time.perf_counter()
            with torch.inference_mode():
                logits = model.logits(model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache))
            prefill = time.perf_counter() - t0
            first = logits[:, -1].argmax(-1, keepdim=True)
            seconds, ids = _decode(model, cache, first, len(prompt), args.tokens)
            results[name] = ids
            print(
                f"{name:12s} prefill {len(prompt)} tokens {prefill * 1e3:7.1f} ms   "
                f"decode {args.tokens / seconds:7.1f} tokens/s ({seconds / args.tokens * 1e3:.2f} ms/token)"
            )
    same = results["cpu_ref"] == results["onnxruntime"]
    print(f"greedy tokens identical: {same}; load average: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
