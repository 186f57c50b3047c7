"""``dsv3.load(path, backend=...)``: a checkpoint onto a backend, as one pipeline (plan, build, stream
the weights, prepare), and the Engine it returns."""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
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
    backend: str | registry.Backend = registry.REFERENCE,
    dtype: str | torch.dtype = "float32",
    attn_impl: str = "absorb",
    act_quant: str = "none",
    formats: tuple[str, ...] = (HP,),
    fmt_of=None,
    device: str | None = None,
    parallel: ParallelContext | None = None,
    reference: registry.Backend | None = None,
    kv_cache_dtype: str = "auto",
) -> Transformer:
    """Instantiate a model (uninitialised weights) with the backend's operators resolved once.

    backend: a backend name, or the Backend a caller already discovered (with ``reference``: cpu_ref,
        which fills the operators it declines); a name discovers the installed backends once.
    parallel: build only this rank's part (``dsv3.model.parallel``); an impossible split is a Dsv3Error here.
    """
    if attn_impl not in ATTN_IMPLS:
        raise Dsv3Error(f"unknown attention form {attn_impl!r}; choose one of {', '.join(ATTN_IMPLS)}")
    if act_quant not in ACT_QUANT_MODES:
        raise Dsv3Error(f"unknown --act-quant {act_quant!r}; choose one of {', '.join(ACT_QUANT_MODES)}")
    if isinstance(backend, str) or reference is None:
        backends = registry.discover()
        backend = registry.get_backend(backend if isinstance(backend, str) else backend.name, backends)
        reference = backends[registry.REFERENCE]
    torch_dtype = _dtype(dtype)
    if parallel is not None:
        check_layout(cfg, parallel.world_size, fmt_of, parallel.dp_attention)
    ops = registry.resolve_ops(backend, formats, act_quant, torch_dtype, reference)
    opts = BuildOptions(torch_dtype, device or backend.info.device, attn_impl, fmt_of, parallel)
    model = Transformer(cfg, ops, opts)
    model.backend_info = backend.info
    if model.ep is not None:  # --dp-attention: the backend's own dispatch/combine, else the reference
        from ..model.ep_comm import resolve_moe_comm

        model.ep.set_comm(*resolve_moe_comm(backend.manager.hook if backend.manager is not None else None))
    if kv_cache_dtype != "auto":
        model.set_kv_cache_dtype(kv_cache_dtype)  # a Dsv3Error naming the backend when it has no fp8 cache
    return model


@dataclass
class LoadPlan:
    """What ``load`` decides before it reads a weight: made once by :func:`plan_load`, read by each step.

    path, files, cfg: the checkpoint directory, its safetensors files and its checked config (MTP
        layers the files lack dropped).
    backend, reference: the chosen backend and cpu_ref, from one discovery.
    dtype, attn_impl, act_quant, parallel, progress: the run's options (progress off on ranks > 0).
    stored_fmt_of, quant_suffix: each linear's format as stored and the suffix of its scale tensors.
    src_fmt, dst_fmt: the format of the checkpoint's quantized linears and the one the model holds
        them in (they differ when the backend converts at load, ``BackendInfo.convert_formats``).
    scale_fmt: the checkpoint's fp8 scale format (``ue8m0`` or None).
    converted: module path -> (src_fmt, dst_fmt) of each linear built in another format than stored;
        filled by :func:`build` through :meth:`fmt_of`, read by :func:`stream_weights`.
    """

    path: Path
    files: CheckpointFiles
    cfg: ModelConfig
    backend: registry.Backend
    reference: registry.Backend
    dtype: torch.dtype
    attn_impl: str
    act_quant: str
    parallel: ParallelContext | None
    progress: bool | None
    stored_fmt_of: Callable[[str], str]
    quant_suffix: str
    src_fmt: str
    dst_fmt: str
    scale_fmt: str | None
    converted: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def formats(self) -> tuple[str, ...]:
        """The weight formats the model's operators are resolved for."""
        return tuple(dict.fromkeys((HP, self.dst_fmt)))

    def fmt_of(self, module_path: str) -> str:
        """The format the model holds linear ``module_path`` in (its stored one unless converted)."""
        stored = self.stored_fmt_of(module_path)
        if stored != self.src_fmt or self.src_fmt == self.dst_fmt:
            return stored
        self.converted[module_path] = (self.src_fmt, self.dst_fmt)
        return self.dst_fmt


def plan_load(
    path: Path,
    backend: registry.Backend,
    reference: registry.Backend,
    dtype: str | torch.dtype,
    attn_impl: str,
    act_quant: str,
    config: str | Path | None,
    weight_format: str | None,
    parallel: ParallelContext | None,
    progress: bool | None,
) -> LoadPlan:
    """Read the checkpoint's config and file index and decide every format; no weight is read."""
    files = CheckpointFiles(path)
    cfg = load_config(config if config is not None else inside_checkpoint(path, "config.json"))
    cfg = drop_absent_mtp(cfg, files)
    check_layers_present(files, cfg)  # before building: the config alone does not decide the model's size
    stored_fmt_of, quant_suffix = format_of_checkpoint(files, cfg)
    if parallel is not None:  # before any weight is read; fp8 splits are checked as stored
        check_layout(cfg, parallel.world_size, stored_fmt_of, parallel.dp_attention)
        progress = False if parallel.rank else progress
    src_fmt = HP if cfg.quantization is None else fmt_of_quantized(cfg)
    dst_fmt = conversion_target(backend.info, src_fmt, weight_format, path)
    scale_fmt = cfg.quantization.scale_fmt if cfg.quantization else None
    return LoadPlan(
        path,
        files,
        cfg,
        backend,
        reference,
        _dtype(dtype),
        attn_impl,
        act_quant,
        parallel,
        progress,
        stored_fmt_of,
        quant_suffix,
        src_fmt,
        dst_fmt,
        scale_fmt,
    )


def build(plan: LoadPlan) -> Transformer:
    """The model on the meta device, its operators resolved for the plan's formats."""
    return build_model(
        plan.cfg,
        plan.backend,
        plan.dtype,
        plan.attn_impl,
        plan.act_quant,
        plan.formats,
        plan.fmt_of,
        device="meta",
        parallel=plan.parallel,
        reference=plan.reference,
    )


def stream_weights(model: Transformer, plan: LoadPlan) -> None:
    """Read every weight from the checkpoint onto the backend's device (converting what the plan converts)."""
    info = plan.backend.info
    load_weights(
        model,
        plan.files,
        plan.cfg,
        plan.quant_suffix,
        info.device,
        plan.dtype,
        plan.progress,
        plan.converted,
        info.convert_weight,
        parallel=plan.parallel,
    )
    model.opts = dataclasses.replace(model.opts, device=info.device, fmt_of=plan.fmt_of)


def prepare(model: Transformer, plan: LoadPlan) -> None:
    """Let the backend prepare each quantized weight once, share the MTP layers' copies, say what fell back."""
    apply_scale_fmt_and_prepare(model, plan.scale_fmt, plan.backend.info.prepare_weight)
    share_mtp_duplicates(model)
    model.prepare_layouts()
    model.eval()
    quiet = plan.parallel is not None and plan.parallel.rank
    if model.ops.fallbacks and model.ops.backend != registry.REFERENCE and not quiet:
        print(
            f"dsv3: backend {model.ops.backend} falls back to cpu_ref for: {', '.join(model.ops.fallbacks)}",
            file=sys.stderr,
        )


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
    kv_cache_dtype: str = "auto",
) -> Engine:
    """Load a Hugging Face-format DeepSeek-V2/V3 checkpoint directory (default: the embedded model).

    One pipeline, each step once: discover the backends, plan (config, formats, conversions,
    layout), build on the meta device, stream the weights, prepare them.

    config: optional JSON/YAML config overriding the directory's config.json.
    weight_format: the format to hold the checkpoint's quantized linears in, for a backend that
        converts them at load (``BackendInfo.convert_formats``, e.g. ascend: fp8_block -> hp or
        int8_w8a8); None takes the backend's default. Nothing converted is written to disk.
    parallel: this process's rank and world (``dsv3.runtime.distributed.init_from_env``): each rank
        reads and holds only its part of the weights; only rank 0 shows a progress bar.
    kv_cache_dtype: ``"auto"`` (caches in the compute dtype) or ``"fp8"`` (the absorbed form's latent cache
        in the FP8 layout of ``dsv3.model.fp8_cache``; the backend must declare ``BackendInfo.kv_cache_fp8``).
    """
    path = _checkpoint_path(ckpt_path)
    backends = registry.discover()
    chosen = registry.get_backend(backend, backends)
    if chosen.info.whole_model is not None:  # runs whole exported graphs (onnxruntime): no operator table
        if parallel is not None and parallel.dp_attention:
            raise Dsv3Error(
                f"--dp-attention: backend {chosen.name} runs whole exported graphs, which cannot dispatch tokens "
                "to other ranks' experts"
            )
        if kv_cache_dtype != "auto":
            raise Dsv3Error(
                f"--kv-cache-dtype {kv_cache_dtype}: backend {chosen.name} runs whole exported graphs, which keep "
                "their own cache in the compute dtype; use --kv-cache-dtype auto"
            )
        kw = dict(dtype=dtype, attn_impl=attn_impl, act_quant=act_quant, config=config, weight_format=weight_format)
        model = chosen.info.whole_model(path, **kw, parallel=parallel, progress=progress)
        return Engine(model, load_tokenizer(path), path)
    args = (dtype, attn_impl, act_quant, config, weight_format, parallel, progress)
    plan = plan_load(path, chosen, backends[registry.REFERENCE], *args)
    model = build(plan)
    if kv_cache_dtype != "auto":
        model.set_kv_cache_dtype(kv_cache_dtype)  # checked before any weight is read
    stream_weights(model, plan)
    prepare(model, plan)
    return Engine(model, load_tokenizer(path), path)


def _checkpoint_path(ckpt_path: str | Path | None) -> Path:
    if ckpt_path is not None:
        return Path(ckpt_path)
    path = embedded_model_path()
    if path is None:
        raise Dsv3Error("no --ckpt-path given and this installation has no embedded model")
    return path


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
