"""Export the model graph to ONNX: one ``step.onnx`` for prefill and decode, weights as external data.

The graph is the unchanged :class:`~dsv3.model.graph.Transformer`, built with an operator table from a small
in-process ``export`` backend whose operators trace to standard ONNX operators (no data-dependent
control flow), and driven through a cache object that updates the latent cache functionally.

``step.onnx`` inputs and outputs (L main layers, C kv_lora_rank, R qk_rope_head_dim, compute dtype ``dt``):

- ``tokens (B, T) int64``, ``positions (B, T) int64`` (each row's positions of the new tokens);
- ``kv_{i} (B, S, C) dt`` and ``pe_{i} (B, S, R) dt`` for i in 0..L-1: the absorbed-MLA cache, indexed by
  position (S >= every position + 1);
- outputs ``logits (B, T, V) float32`` and ``kv_{i}_out``/``pe_{i}_out``: the caches with the new tokens'
  entries written at their positions.

Prefill is T = prompt length, decode is T = 1; B, T and S are dynamic. Key ``j`` is visible to the query
at position ``p`` iff ``j <= p``, so entries past a row's position (zeros or stale) never matter.
``manifest.json`` beside it records the dtype, the position limit and the names; ``config.json`` and the
tokenizer files are copied so the directory is a self-contained model for ``dsv3 run --backend onnxruntime``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .. import registry
from ..errors import Dsv3Error
from ..hookspecs import CONTRACT_VERSION, BackendInfo, OpRequest, hookimpl
from ..model.config import load_raw_config
from ..weights import HP, Weight

GRAPH_FILE = "step.onnx"
DATA_FILE = "step.onnx.data"
MANIFEST = "manifest.json"
FORMAT_VERSION = 1
EXPORTERS = ("torchscript", "dynamo")
EXPORT_DTYPES = {"float32": torch.float32, "float16": torch.float16}
#: Files copied from the checkpoint so the export directory can be loaded on its own.
COPIED = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")


# ---------------------------------------------------------------------------- export-friendly operators
def dense_moe_experts(
    x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w1: Weight, w3: Weight, w2: Weight, expert_offset=0
) -> torch.Tensor:
    """x (N, D), weights/ids (N, k), w1/w3 (E, I, D), w2 (E, D, I) hp -> (N, D) x.dtype.

    Every token through every expert, combined with the routing weights scattered into an (N, E)
    matrix (zero for experts not chosen): ``y = sum_e w[:, e] * expert_e(x)``. Exact (a zero weight
    contributes exactly 0) with no data-dependent control flow; costs E/k times the routed FLOPs,
    which is what small models can afford. Ids outside this rank's experts are dropped.
    """
    e = w1.data.shape[0]
    local = ids - expert_offset  # (N, k)
    inside = (local >= 0) & (local < e)
    dense = torch.zeros(x.shape[0], e, dtype=torch.float32, device=x.device)  # (N, E)
    dense = dense.scatter(1, local.clamp(0, e - 1), torch.where(inside, weights.float(), 0.0))
    gate = torch.einsum("nd,eid->nei", x, w1.data)  # (N, E, I)
    up = torch.einsum("nd,eid->nei", x, w3.data)  # (N, E, I)
    y = torch.einsum("nei,edi->ned", F.silu(gate) * up, w2.data)  # (N, E, D)
    return torch.einsum("ne,ned->nd", dense, y.float()).to(x.dtype)


class ExportBackend:
    """The ``export`` backend: built in-process with ``registry.make_backend``, never registered.

    It supplies the expert computation (above); every other operator is cpu_ref's, which is already
    plain, out-of-place tensor algebra that traces to standard ONNX operators (Einsum, Where, Softmax,
    TopK, ScatterElements...).
    """

    @hookimpl
    def dsv3_backend_info(self) -> BackendInfo:
        return BackendInfo(
            name="export",
            description="ONNX export: trace-friendly operators",
            contract_version=CONTRACT_VERSION,
            formats=(HP,),
        )

    @hookimpl
    def dsv3_op_moe_experts(self, request: OpRequest):
        return dense_moe_experts if request.fmt == HP else None


# ---------------------------------------------------------------------------- functional cache
class FunctionalLayerCache:
    """Stands in for ``LayerCache`` during export: writes out of place and returns the whole buffer.

    tensors: ``kv (B, S, C)``, ``pe (B, S, R)``; after the forward they hold the updated copies.
    The export keeps this contiguous layout (not the paged one of ``Transformer.new_cache``).
    """

    paged = False

    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.tensors = tensors

    def write_and_read(self, new: dict[str, torch.Tensor], positions: torch.Tensor) -> dict:
        """new[name] (B, T, ...) at positions (B, T) -> every buffer (B, S, ...) with them written."""
        b = positions.shape[0]
        batch = torch.arange(b, device=positions.device).unsqueeze(1).expand_as(positions)  # (B, T)
        for name, value in new.items():
            buf = self.tensors[name]
            self.tensors[name] = buf.index_put((batch, positions), value.to(buf.dtype))  # ScatterND
        return dict(self.tensors)


class _Caches:
    def __init__(self, layers: list[FunctionalLayerCache]):
        self.main = layers

    def view(self, rows=None, length=None, positions=None) -> _Caches:
        return self  # export traces one full-length step: the whole buffer is read back


class StepGraph(nn.Module):
    """``(tokens, positions, kv_0, pe_0, ..., kv_{L-1}, pe_{L-1}) -> (logits, kv_0', pe_0', ...)``."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, *caches: torch.Tensor):
        layers = [FunctionalLayerCache({"kv": caches[2 * i], "pe": caches[2 * i + 1]}) for i in range(len(caches) // 2)]
        hidden = self.model(tokens, positions, _Caches(layers))  # (B, T, D)
        logits = self.model.logits(hidden)  # (B, T, V) float32
        out = [logits]
        for layer in layers:
            out += [layer.tensors["kv"], layer.tensors["pe"]]
        return tuple(out)


# ---------------------------------------------------------------------------- export
@dataclass
class ExportResult:
    out: Path
    seconds: float
    nbytes: int


def cache_names(n_layers: int) -> list[str]:
    return [f"{kind}_{i}" for i in range(n_layers) for kind in ("kv", "pe")]


def load_for_export(ckpt_path: str | Path | None, dtype: str, config: str | Path | None = None):
    """Load a high-precision checkpoint with the export operator table -> (Engine, checkpoint dir)."""
    from ..runtime.loading import embedded_model_path, load

    if dtype not in EXPORT_DTYPES:
        raise Dsv3Error(f"unknown export dtype {dtype!r}; choose one of {', '.join(EXPORT_DTYPES)}")
    path = Path(ckpt_path) if ckpt_path is not None else embedded_model_path()
    if path is None:
        raise Dsv3Error("no --ckpt-path given and this installation has no embedded model")
    engine = load(path, registry.REFERENCE, dtype, config=config, progress=False)
    if engine.cfg.quantization is not None:
        raise Dsv3Error(
            f"{path}: ONNX export takes high-precision weights; this checkpoint is quantized "
            "(make a bf16 copy with `dsv3 convert` first)"
        )
    engine.model = with_export_ops(engine.model)
    return engine, path


def with_export_ops(model):
    """The same model (shared weight tensors) rebuilt with the export backend's operator table."""
    from ..model.graph import BuildOptions, Transformer

    if model.opts.kv_cache_dtype != "auto":
        raise Dsv3Error(
            f"--kv-cache-dtype {model.opts.kv_cache_dtype}: the ONNX export keeps its own contiguous cache in the "
            "compute dtype; use --kv-cache-dtype auto"
        )
    reference = registry.discover()[registry.REFERENCE]
    ops = registry.resolve_ops(
        registry.make_backend(ExportBackend(), "export"), (HP,), "none", model.opts.dtype, reference
    )
    # one graph serves every step, decode included: keep the absorbed form throughout
    opts = BuildOptions(model.opts.dtype, "meta", model.opts.attn_impl, naive_prefill=False)
    exported = Transformer(model.cfg, ops, opts)
    exported.load_state_dict(model.state_dict(), assign=True)
    exported.backend_info = model.backend_info
    return exported.eval()


def example_inputs(model, batch: int = 2, t: int = 3, s: int = 8) -> tuple[torch.Tensor, ...]:
    """Small example inputs for tracing (the exported graph is dynamic in B, T and S)."""
    cfg, dt = model.cfg, model.opts.dtype
    tokens = torch.zeros(batch, t, dtype=torch.long)
    positions = torch.arange(t).expand(batch, t).contiguous()
    caches = []
    for _ in range(cfg.num_hidden_layers):
        caches += [
            torch.zeros(batch, s, cfg.kv_lora_rank, dtype=dt),
            torch.zeros(batch, s, cfg.qk_rope_head_dim, dtype=dt),
        ]
    return (tokens, positions, *caches)


def export_onnx(
    ckpt_path: str | Path | None,
    out: str | Path,
    opset: int = 18,
    dtype: str = "float32",
    max_len: int | None = None,
    config: str | Path | None = None,
    exporter: str = "torchscript",
) -> ExportResult:
    """Export ``step.onnx`` (+ external weights, manifest, config, tokenizer) into ``out``.

    Written into a temporary sibling directory and renamed into place, so a failed export leaves
    nothing half-written. ``out`` must not exist or be empty. max_len bounds the positions the graph
    accepts (its RoPE table); default the model's max_position_embeddings. config: a JSON/YAML config
    overriding the checkpoint's config.json (written into ``out`` as config.json). exporter:
    ``torchscript`` (torch.onnx's tracing exporter: seconds) or ``dynamo`` (torch.export based: about
    30x slower here, same graph semantics).
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise Dsv3Error(f"{out}: output directory exists and is not empty")
    if exporter not in EXPORTERS:
        raise Dsv3Error(f"unknown exporter {exporter!r}; choose one of {', '.join(EXPORTERS)}")
    start = time.perf_counter()
    engine, path = load_for_export(ckpt_path, dtype, config)
    model = engine.model
    limit = model.cfg.max_position_embeddings
    max_len = limit if max_len is None else max_len
    if not 0 < max_len <= limit:
        raise Dsv3Error(f"--max-len must be in [1, {limit}] (max_position_embeddings); got {max_len}")
    model.extend_rope(max_len)  # the tables start short and grow on demand; the graph holds them whole
    model.rope_cos, model.rope_sin = model.rope_cos[:max_len].clone(), model.rope_sin[:max_len].clone()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        _export_graph(model, tmp, opset, exporter)
        names = cache_names(model.cfg.num_hidden_layers)
        manifest = {
            "format_version": FORMAT_VERSION,
            "graph": GRAPH_FILE,
            "dtype": dtype,
            "opset": opset,
            "exporter": exporter,
            "max_len": max_len,
            "num_layers": model.cfg.num_hidden_layers,
            "kv_lora_rank": model.cfg.kv_lora_rank,
            "qk_rope_head_dim": model.cfg.qk_rope_head_dim,
            "vocab_size": model.cfg.vocab_size,
            "inputs": ["tokens", "positions", *names],
            "outputs": ["logits", *[f"{n}_out" for n in names]],
            "source": str(path),
            "torch": torch.__version__,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        for name in COPIED:
            if (path / name).is_file():
                shutil.copyfile(path / name, tmp / name)
        if config is not None:
            _copy_config_as_json(Path(config), tmp / "config.json")
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    nbytes = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith(GRAPH_FILE))
    return ExportResult(out, time.perf_counter() - start, nbytes)


def _copy_config_as_json(src: Path, dst: Path) -> None:
    """Copy a JSON or YAML config as JSON (the export directory's config.json); already parsed by load."""
    if src.is_dir():
        src = src / "config.json"
    if src.suffix in (".yaml", ".yml"):
        dst.write_text(json.dumps(load_raw_config(src), indent=2) + "\n")
    else:
        shutil.copyfile(src, dst)


def _constants_to_initializers(proto, min_bytes: int = 1024) -> None:
    """Turn large Constant nodes (the tracer inlines buffers such as the RoPE tables) into initializers,
    so that they too go to the external data file."""
    keep = []
    for node in proto.graph.node:
        attr = node.attribute[0] if node.op_type == "Constant" and len(node.attribute) == 1 else None
        if attr is not None and attr.name == "value" and len(attr.t.raw_data) >= min_bytes:
            tensor = attr.t
            tensor.name = node.output[0]
            proto.graph.initializer.append(tensor)
        else:
            keep.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(keep)


def _export_graph(model, where: Path, opset: int, exporter: str) -> None:
    """Trace ``StepGraph(model)`` into ``where/step.onnx`` (+ ``step.onnx.data``) and check it."""
    import onnx

    names = cache_names(model.cfg.num_hidden_layers)
    inputs = ["tokens", "positions", *names]
    outputs = ["logits", *[f"{n}_out" for n in names]]
    graph = where / GRAPH_FILE
    kwargs: dict = dict(input_names=inputs, output_names=outputs, opset_version=opset, verbose=False)
    if exporter == "dynamo":
        batch, new, cache_len = (torch.export.Dim.DYNAMIC,) * 3
        seq = {0: batch, 1: new}
        kwargs["dynamic_shapes"] = (seq, seq, tuple({0: batch, 1: cache_len} for _ in names))
    else:
        seq, cached = {0: "batch", 1: "new"}, {0: "batch", 1: "cache_len"}
        axes = {"tokens": seq, "positions": seq, "logits": seq}
        axes.update({n: cached for n in names})
        axes.update({n: cached for n in outputs[1:]})
        kwargs["dynamic_axes"] = axes
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about shapes turned into graph values
        torch.onnx.export(
            StepGraph(model).eval(), example_inputs(model), str(graph), dynamo=exporter == "dynamo", **kwargs
        )
    proto = onnx.load(str(graph))  # loads any external data the exporter wrote
    for f in where.iterdir():  # onnx appends to an existing data file: start from none
        if f != graph:
            f.unlink()
    _constants_to_initializers(proto)
    onnx.save_model(proto, str(graph), save_as_external_data=True, all_tensors_to_one_file=True, location=DATA_FILE)
    onnx.checker.check_model(str(graph), full_check=True)
    (where / DATA_FILE).chmod(0o644)
