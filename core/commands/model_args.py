"""The flags every command that loads a model shares, and the one ``dsv3.load`` call they describe."""

from __future__ import annotations

import argparse

from .. import registry
from ..model.fp8_cache import KV_CACHE_DTYPES
from ..model.graph import ATTN_IMPLS
from ..model.parallel import ParallelContext
from ..runtime.engine import Engine
from ..runtime.loading import DTYPES, load
from ..weights import ACT_QUANT_MODES, FORMATS


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The flags every command that loads a model shares."""
    p.add_argument("--ckpt-path", help="Hugging Face-format checkpoint directory (default: the embedded model)")
    p.add_argument("--config", help="JSON or YAML config to use instead of the directory's config.json")
    p.add_argument("--backend", default=registry.REFERENCE, help="backend plugin (see `dsv3 backends`)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16", help="compute dtype")
    p.add_argument("--attn-impl", choices=ATTN_IMPLS, default="absorb", help="MLA form: latent cache or per-head K/V")
    p.add_argument(
        "--act-quant", choices=ACT_QUANT_MODES, default="none", help="quantize activations for quantized weights"
    )
    p.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default="auto",
        help="latent cache storage: auto = the compute dtype; fp8 = e4m3 latent with a float32 scale per 128 "
        "values and the roped key in the compute dtype (656 bytes/token/layer at 671B in bf16, against 1152)",
    )
    p.add_argument(
        "--enforce-eager",
        action="store_true",
        help="run every decode step eagerly; by default a backend that captures graphs (nvidia, amd) replays "
        "the step from one CUDA/HIP graph per batch-size bucket",
    )
    p.add_argument(
        "--weight-format",
        choices=FORMATS,
        default=None,
        help="convert the checkpoint's quantized weights at load to this format, on a backend that converts "
        "them (e.g. ascend: fp8_block -> hp or int8_w8a8; see `dsv3 backends`); default: the backend's choice",
    )


def load_from_args(args, parallel: ParallelContext | None = None, progress: bool | None = None) -> Engine:
    """``dsv3.load`` with the model flags of ``add_model_args`` (``--weight-format`` where the command has it)."""
    engine = load(
        args.ckpt_path,
        args.backend,
        args.dtype,
        args.attn_impl,
        args.act_quant,
        args.config,
        progress=progress,
        weight_format=getattr(args, "weight_format", None),
        parallel=parallel,
        kv_cache_dtype=getattr(args, "kv_cache_dtype", "auto"),
    )
    engine.enforce_eager = bool(getattr(args, "enforce_eager", False))
    return engine
