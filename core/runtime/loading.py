"""The Python API: ``dsv3.load(path, backend=...)`` and the Engine it returns."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

from .. import registry
from ..errors import Dsv3Error
from ..model.config import ModelConfig, load_config
from ..model.graph import ATTN_IMPLS, BuildOptions, Transformer
from ..model.parallel import ParallelContext, check_layout
from ..weights import ACT_QUANT_MODES, HP
from .checkpoint import (
    CheckpointFiles,
    apply_scale_fmt_and_prepare,
    check_layers_present,
    format_of_checkpoint,
    inside_checkpoint,
    load_weights,
    share_mtp_duplicates,
)
from .engine import Engine
from .tokenizer import load_tokenizer

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def embedded_model_path() -> Path | None:
    """The small model shipped inside the package, if this installation has it."""
    from importlib.resources import files

    try:
        path = Path(str(files("dsv3") / "embedded" / "tiny-dsv3"))
    except ModuleNotFoundError:
        return None
    return path if (path / "config.json").exists() else None


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise Dsv3Error(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def build_model(
    cfg: ModelConfig,
    backend: str = registry.REFERENCE,
    dtype: str | torch.dtype = "float32",
    attn_impl: str = "absorb",
    act_quant: str = "none",
    formats: tuple[str, ...] = (HP,),
    fmt_of=None,
    device: str | None = None,
    parallel: ParallelContext | None = None,
) -> Transformer:
    """Instantiate a model (uninitialised weights) with the backend's operators resolved once.

    parallel: build only this rank's part (``dsv3.model.parallel``); an impossible split is a Dsv3Error here.
    """
    if attn_impl not in ATTN_IMPLS:
        raise Dsv3Error(f"unknown attention form {attn_impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
    if act_quant not in ACT_QUANT_MODES:
        raise Dsv3Error(f"unknown --act-quant {act_quant!r}; choose one of {', '.join(ACT_QUANT_MODES)}")
    backends = registry.discover()
    chosen = registry.get_backend(backend, backends)
    torch_dtype = _dtype(dtype)
    if parallel is not None:
        check_layout(cfg, parallel.world_size, fmt_of)
    ops = registry.resolve_ops(chosen, formats, act_quant, torch_dtype, backends[registry.REFERENCE])
    opts = BuildOptions(torch_dtype, device or chosen.info.device, attn_impl, fmt_of, parallel)
    model = Transformer(cfg, ops, opts)
    model.backend_info = chosen.info
    return model


def load(
    ckpt_path: str | Path | None = None,
    backend: str = registry.REFERENCE,
    dtype: str | torch.dtype = "bfloat16",
    attn_impl: str = "absorb",
    act_quant: str = "none",
    config: str | Path | None = None,
    progress: bool | None = None,
    weight_format: str | None = None,
    parallel: ParallelContext | None = None,
) -> Engine:
    """Load a Hugging Face-format DeepSeek-V2/V3 checkpoint directory (default: the embedded model).

    config: optional JSON/YAML config overriding the directory's config.json.
    weight_format: the format to hold the checkpoint's quantized linears in, for a backend that
        converts them at load (``BackendInfo.convert_formats``, e.g. ascend: fp8_block -> hp or
        int8_w8a8); None takes the backend's default. Nothing converted is written to disk.
    parallel: this process's rank and world (``dsv3.runtime.distributed.init_from_env``): each rank reads and
        holds only its part of the weights; only rank 0 shows a progress bar.
    """
    if ckpt_path is None:
        ckpt_path = embedded_model_path()
        if ckpt_path is None:
            raise Dsv3Error("no --ckpt-path given and this installation has no embedded model")
    path = Path(ckpt_path)
    whole_model = registry.get_backend(backend).info.extra.get("whole_model")
    if whole_model is not None:  # a backend that runs whole exported graphs (onnxruntime), no operator table
        kw = dict(dtype=dtype, attn_impl=attn_impl, act_quant=act_quant, config=config, weight_format=weight_format)
        return Engine(whole_model(path, **kw, parallel=parallel, progress=progress), load_tokenizer(path), path)
    files = CheckpointFiles(path)
    cfg = load_config(config if config is not None else inside_checkpoint(path, "config.json"))
    cfg = drop_absent_mtp(cfg, files)
    check_layers_present(files, cfg)  # before building: the config alone does not decide the model's size
    fmt_of, quant_suffix = format_of_checkpoint(files, cfg)
    if parallel is not None:  # before any weight is read; fp8 splits are checked as stored
        check_layout(cfg, parallel.world_size, fmt_of)
        progress = False if parallel.rank else progress
    src_fmt = HP if cfg.quantization is None else fmt_of_quantized(cfg)
    dst_fmt = conversion_target(registry.get_backend(backend).info, src_fmt, weight_format, path)
    converted: dict[str, tuple[str, str]] = {}  # filled while the model is built
    if dst_fmt != src_fmt:
        fmt_of = _converting(fmt_of, src_fmt, dst_fmt, converted)
    formats = tuple(dict.fromkeys((HP, dst_fmt)))
    model = build_model(cfg, backend, dtype, attn_impl, act_quant, formats, fmt_of, device="meta", parallel=parallel)
    device = model.backend_info.device
    convert = model.backend_info.convert_weight
    load_weights(
        model, files, cfg, quant_suffix, device, _dtype(dtype), progress, converted, convert, parallel=parallel
    )
    model.opts = dataclasses.replace(model.opts, device=device, fmt_of=fmt_of)
    scale_fmt = cfg.quantization.scale_fmt if cfg.quantization else None
    apply_scale_fmt_and_prepare(model, scale_fmt, model.backend_info.prepare_weight)
    share_mtp_duplicates(model)
    model.eval()
    if model.ops.fallbacks and model.ops.backend != registry.REFERENCE and not (parallel and parallel.rank):
        print(
            f"dsv3: backend {model.ops.backend} falls back to cpu_ref for: {', '.join(model.ops.fallbacks)}",
            file=sys.stderr,
        )
    return Engine(model, load_tokenizer(path), path)


def conversion_target(info, src_fmt: str, requested: str | None, where: Path) -> str:
    """The format the model holds the checkpoint's ``src_fmt`` linears in on this backend.

    A backend converts what it lists in ``convert_formats`` (default: the first target); what it
    does not list it holds as stored. A request it cannot honour is a Dsv3Error.
    """
    allowed = tuple(info.convert_formats.get(src_fmt, ()))
    if requested is None:
        return allowed[0] if allowed else src_fmt
    if requested in allowed or (requested == src_fmt and not allowed):
        return requested
    if src_fmt == HP:
        raise Dsv3Error(f"weight format {requested!r}: {where} has no quantized weights to convert")
    choices = " or ".join(allowed) if allowed else f"{src_fmt} (as stored)"
    raise Dsv3Error(
        f"weight format {requested!r} is not available: backend {info.name} runs the {src_fmt} weights "
        f"of {where} as {choices}"
    )


def _converting(fmt_of, src_fmt: str, dst_fmt: str, record: dict[str, tuple[str, str]]):
    """Wrap ``fmt_of`` so ``src_fmt`` linears are built in ``dst_fmt``, recording each in ``record``."""

    def fmt(module_path: str) -> str:
        stored = fmt_of(module_path)
        if stored != src_fmt:
            return stored
        record[module_path] = (src_fmt, dst_fmt)
        return dst_fmt

    return fmt


def drop_absent_mtp(cfg: ModelConfig, files: CheckpointFiles) -> ModelConfig:
    """transformers declares num_nextn_predict_layers but saves no MTP weights: such a checkpoint has none."""
    if cfg.num_nextn_predict_layers == 0:
        return cfg
    prefix = f"model.layers.{cfg.num_hidden_layers}."
    if any(k.startswith(prefix) for k in files.keys()):
        return cfg
    return dataclasses.replace(cfg, num_nextn_predict_layers=0)


def fmt_of_quantized(cfg: ModelConfig) -> str:
    """The format of the checkpoint's quantized linears (fp8_block, int8_w8a8 or int8_wo)."""
    from ..model.config import checkpoint_format

    return checkpoint_format(cfg.quantization, cfg.source)
