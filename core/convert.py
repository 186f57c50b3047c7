"""``dsv3 convert``: rewrite a checkpoint's linear weights in another format, shard by shard.

Which tensors are quantized is exactly what the released DeepSeek-V3 FP8 checkpoint quantizes:
the weights of every attention projection (q_a/q_b/q/kv_a_proj_with_mqa/kv_b/o_proj), every dense
MLP, shared-expert and routed-expert projection (gate/up/down_proj), in the main layers and in the
MTP layers' decoder blocks. Norms, embeddings, lm_head, the router gate (``mlp.gate``), its
``e_score_correction_bias`` and the MTP ``eh_proj``/``shared_head`` stay in high precision and are
copied byte for byte (the released checkpoint also keeps ``eh_proj`` in BF16).

Memory is bounded: tensors are read one at a time through safetensors' memory map and each output
shard is written as soon as it is full, so the peak is about ``max_shard_size`` plus one tensor in
float32. Everything is written into a temporary directory next to ``out`` and renamed into place
at the end: a failure (or Ctrl-C) leaves no output directory behind. The input is only read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from .checkpoint import PICKLE_SUFFIXES, CheckpointFiles
from .config import load_config
from .errors import Dsv3Error
from .quantize import dequantize, quantization_config, quantize_weight
from .weights import FP8_BLOCK, FP8_BLOCK_SIZE, HP, INT8_W8A8, INT8_WO, Weight, fp8_scale_shape

#: ``--to`` choices: (format of the quantized projections, dtype of high-precision outputs).
TARGETS: dict[str, tuple[str, torch.dtype]] = {
    "bf16": (HP, torch.bfloat16),
    "fp16": (HP, torch.float16),
    "fp32": (HP, torch.float32),
    "fp8": (FP8_BLOCK, torch.bfloat16),
    "int8": (INT8_W8A8, torch.bfloat16),
    "int8-wo": (INT8_WO, torch.bfloat16),
}

#: Module names whose ``.weight`` the released FP8 checkpoint stores quantized.
QUANTIZED_PROJECTIONS = frozenset(
    {
        "q_a_proj",
        "q_b_proj",
        "q_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
)

_FP8_SCALE, _INT8_SCALE = "weight_scale_inv", "weight_scale"
_SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "I8": torch.int8,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_TORCH_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}
DEFAULT_MAX_SHARD_SIZE = 5 * 10**9


def is_quantized_projection(name: str) -> bool:
    """Whether the checkpoint tensor ``name`` is a weight the released format quantizes."""
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANTIZED_PROJECTIONS


def parse_size(text: str | int) -> int:
    """``"5GB"`` -> 5 * 10**9, ``"512MiB"`` -> 512 * 2**20, ``"1000"`` -> 1000 bytes."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
        if not m:
            raise Dsv3Error(f"--max-shard-size {text!r}: expected a size such as 5GB, 500MB or 1000000")
        unit = (m.group(2) or "B").upper()
        powers = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
        powers.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})
        value = int(float(m.group(1)) * powers[unit])
    if value <= 0:
        raise Dsv3Error(f"--max-shard-size must be positive, got {text!r}")
    return value


@dataclass
class _Item:
    """One unit of output: a plain tensor, or a linear weight together with its scale."""

    name: str  # the checkpoint name of the (weight) tensor
    src_fmt: str  # HP, FP8_BLOCK or INT8_W8A8 (int8 on disk, whichever activation scheme)
    action: str  # "copy", "dequantize" or "quantize"
    dst_fmt: str
    outputs: list[tuple[str, tuple[int, ...], torch.dtype]] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        total = 0
        for _, shape, dtype in self.outputs:
            n = 1
            for d in shape:
                n *= d
            total += n * dtype.itemsize
        return total


@dataclass
class ConvertResult:
    """What a conversion wrote."""

    out: Path
    files: list[str]
    n_tensors: int
    n_quantized: int
    nbytes: int


def _out_shapes(name: str, shape: tuple[int, ...], fmt: str, hp_dtype: torch.dtype):
    base = name[: -len(".weight")]
    if fmt == FP8_BLOCK:
        return [
            (name, shape, torch.float8_e4m3fn),
            (f"{base}.{_FP8_SCALE}", fp8_scale_shape(*shape, FP8_BLOCK_SIZE), torch.float32),
        ]
    if fmt in (INT8_W8A8, INT8_WO):
        return [(name, shape, torch.int8), (f"{base}.{_INT8_SCALE}", shape[:-1], torch.float32)]
    return [(name, shape, hp_dtype)]


def _source_format(files: CheckpointFiles, name: str, keys: set[str]) -> str:
    """The on-disk format of weight ``name``, checking its scale tensor's presence, dtype and shape."""
    base = name[: -len(".weight")] if name.endswith(".weight") else None
    fp8_scale = f"{base}.{_FP8_SCALE}" if base else None
    int8_scale = f"{base}.{_INT8_SCALE}" if base else None
    dtype, shape = files.dtype(name), files.shape(name)
    where = files.where[name]
    if base and fp8_scale in keys and int8_scale in keys:
        raise Dsv3Error(f"{where}: weight {name} has both {fp8_scale} and {int8_scale}")
    if base and fp8_scale in keys:
        if dtype != "F8_E4M3":
            raise Dsv3Error(f"{where}: tensor {name} has dtype {dtype}, expected F8_E4M3 (it has {fp8_scale})")
        want = fp8_scale_shape(*shape[-2:], FP8_BLOCK_SIZE) if len(shape) == 2 else None
        if want is None or files.shape(fp8_scale) != want:
            raise Dsv3Error(
                f"{files.where[fp8_scale]}: scale tensor {fp8_scale} has shape {list(files.shape(fp8_scale))}, "
                f"expected {list(want) if want else '(ceil(out/128), ceil(in/128))'} for weight {name} {list(shape)}"
            )
        return FP8_BLOCK
    if base and int8_scale in keys:
        if dtype != "I8":
            raise Dsv3Error(f"{where}: tensor {name} has dtype {dtype}, expected I8 (it has {int8_scale})")
        if len(shape) != 2 or files.shape(int8_scale) != shape[:-1]:
            raise Dsv3Error(
                f"{files.where[int8_scale]}: scale tensor {int8_scale} has shape {list(files.shape(int8_scale))}, "
                f"expected {list(shape[:-1])} for weight {name} {list(shape)}"
            )
        return INT8_W8A8
    if dtype in ("F8_E4M3", "F8_E5M2", "I8"):
        raise Dsv3Error(f"{where}: missing scale tensor ({_FP8_SCALE} or {_INT8_SCALE}) for {dtype} weight {name}")
    return HP


def _plan(files: CheckpointFiles, dst_fmt: str, hp_dtype: torch.dtype, requant_fp8: bool) -> list[_Item]:
    """Decide, from the safetensors headers alone, what each input tensor becomes.

    requant_fp8: fp8 weights are re-quantized (a new scale format was asked for) instead of copied.
    """
    keys = files.keys()
    scales = {k for k in keys if k.endswith((f".{_FP8_SCALE}", f".{_INT8_SCALE}"))}
    for s in sorted(scales):
        weight = s.rsplit(".", 1)[0] + ".weight"
        if weight not in keys:
            raise Dsv3Error(f"{files.where[s]}: scale tensor {s} has no weight {weight}")
    by_file: dict[Path, list[str]] = {}
    for name in sorted(keys - scales):
        by_file.setdefault(files.where[name], []).append(name)
    items = []
    for file in sorted(by_file):  # input shard by input shard: reads stay local
        for name in by_file[file]:
            shape = files.shape(name)
            src_fmt = _source_format(files, name, keys)
            dtype = _SAFETENSORS_DTYPES.get(files.dtype(name))
            if dtype is None:
                raise Dsv3Error(f"{file}: tensor {name} has dtype {files.dtype(name)}, which dsv3 cannot convert")
            projection = (
                is_quantized_projection(name) and len(shape) == 2 and (src_fmt != HP or dtype.is_floating_point)
            )
            if dst_fmt != HP and projection:
                same = (src_fmt == FP8_BLOCK and not requant_fp8) if dst_fmt == FP8_BLOCK else src_fmt == INT8_W8A8
                action, fmt = ("copy" if same else "quantize"), dst_fmt
            elif src_fmt != HP:
                action, fmt = "dequantize", HP
            elif dst_fmt == HP and projection:
                action, fmt = "dequantize", HP  # a cast to the target dtype
            else:
                items.append(_Item(name, HP, "copy", HP, [(name, shape, dtype)]))
                continue
            items.append(_Item(name, src_fmt, action, fmt, _out_shapes(name, shape, fmt, hp_dtype)))
    return items


def _shards(items: list[_Item], max_bytes: int) -> list[list[_Item]]:
    """Greedy packing in input order; a weight and its scale always share a shard."""
    shards: list[list[_Item]] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item.nbytes
    return shards


def _read_weight(files: CheckpointFiles, item: _Item) -> Weight:
    data = files.get(item.name)
    base = item.name[: -len(".weight")]
    if item.src_fmt == FP8_BLOCK:
        return Weight(data, FP8_BLOCK, files.get(f"{base}.{_FP8_SCALE}"))
    if item.src_fmt == INT8_W8A8:
        return Weight(data, INT8_W8A8, files.get(f"{base}.{_INT8_SCALE}"))
    return Weight(data, HP)


def convert_item(files: CheckpointFiles, item: _Item, hp_dtype: torch.dtype, scale_fmt: str | None) -> dict:
    """The output tensors of one planned item (name -> tensor)."""
    if item.action == "copy" and item.src_fmt == HP:
        return {item.name: files.get(item.name)}
    w = _read_weight(files, item)
    if item.action == "copy":
        return {name: t for (name, _, _), t in zip(item.outputs, (w.data, w.scale), strict=True)}
    if item.action == "dequantize":
        return {item.name: dequantize(w, hp_dtype)}
    q = quantize_weight(dequantize(w, torch.float32), item.dst_fmt, scale_fmt)
    return {name: t for (name, _, _), t in zip(item.outputs, (q.data, q.scale), strict=True)}


def _check_paths(src: Path, out: Path, force: bool) -> None:
    s, o = src.resolve(), out.resolve()
    if o == s or s in o.parents:
        raise Dsv3Error(f"--out {out}: is the input checkpoint {src} or inside it; choose another directory")
    if o in s.parents:
        raise Dsv3Error(f"--out {out}: contains the input checkpoint {src}; choose another directory")
    if out.exists() and not out.is_dir():
        raise Dsv3Error(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise Dsv3Error(f"--out {out}: exists and is not empty (pass --force to replace it)")


def _side_files(src: Path) -> list[Path]:
    """Top-level files to copy unchanged: tokenizer, generation config, chat template, model code."""
    keep = []
    for p in sorted(src.iterdir()):
        if not p.is_file() or p.name.startswith("."):
            continue
        if p.name == "config.json" or p.name.endswith((".safetensors", ".safetensors.index.json")):
            continue
        if p.suffix in PICKLE_SUFFIXES:
            continue
        keep.append(p)
    return keep


def _new_config(raw: dict, dst_fmt: str, hp_dtype: torch.dtype, scale_fmt: str | None) -> dict:
    cfg = dict(raw)
    q = quantization_config(dst_fmt, scale_fmt)
    if q is None:
        cfg.pop("quantization_config", None)
        for key in ("torch_dtype", "dtype"):
            if key in cfg:
                cfg[key] = _TORCH_DTYPE_NAMES[hp_dtype]
    else:
        cfg["quantization_config"] = q
    return cfg


def _install(tmp: Path, out: Path) -> None:
    """Move the finished temporary directory to ``out`` (replacing an old ``out`` only at the end)."""
    if not out.exists():
        tmp.rename(out)
        return
    old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
    out.rename(old)
    try:
        tmp.rename(out)
    except BaseException:
        old.rename(out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    to: str,
    scale_fmt: str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    force: bool = False,
    progress: bool | None = None,
) -> ConvertResult:
    """Convert checkpoint directory ``src`` into ``out`` with its projections in format ``to`` (see TARGETS).

    scale_fmt: ``"ue8m0"`` rounds fp8 weight scales up to powers of two and says so in the config.
    force: replace a non-empty ``out`` (never the input, never a directory holding the input).
    """
    if to not in TARGETS:
        raise Dsv3Error(f"--to {to!r}: choose one of {', '.join(TARGETS)}")
    dst_fmt, hp_dtype = TARGETS[to]
    if scale_fmt not in (None, "ue8m0"):
        raise Dsv3Error(f"--scale-fmt {scale_fmt!r}: only ue8m0 is supported")
    if scale_fmt is not None and dst_fmt != FP8_BLOCK:
        raise Dsv3Error("--scale-fmt applies to --to fp8 only")
    src, out = Path(src), Path(out)
    max_bytes = parse_size(max_shard_size)
    files = CheckpointFiles(src)
    _check_paths(src, out, force)
    cfg = load_config(src / "config.json")
    raw = json.loads((src / "config.json").read_text())
    src_scale_fmt = cfg.quantization.scale_fmt if cfg.quantization is not None else None
    requant_fp8 = scale_fmt is not None and scale_fmt != src_scale_fmt
    if scale_fmt is None and dst_fmt == FP8_BLOCK:
        scale_fmt = src_scale_fmt  # fp8 weights copied from the source keep its scale format
    items = _plan(files, dst_fmt, hp_dtype, requant_fp8)
    shards = _shards(items, max_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    total = sum(item.nbytes for item in items)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    try:
        weight_map = {}
        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"converting to {to}", disable=_disable(progress))
        with bar:
            for fname, shard in zip(names, shards, strict=True):
                tensors: dict[str, torch.Tensor] = {}
                for item in shard:
                    produced = convert_item(files, item, hp_dtype, scale_fmt)
                    for name, shape, dtype in item.outputs:
                        t = produced[name]
                        if tuple(t.shape) != tuple(shape) or t.dtype != dtype:  # a bug here, not bad input
                            raise RuntimeError(f"{name}: produced {t.dtype} {list(t.shape)}, planned {dtype} {shape}")
                        tensors[name] = t.contiguous()
                        weight_map[name] = fname
                    bar.update(item.nbytes)
                save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
                del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        new_cfg = _new_config(raw, dst_fmt, hp_dtype, scale_fmt)
        (tmp / "config.json").write_text(json.dumps(new_cfg, indent=2) + "\n")
        for side in _side_files(src):
            shutil.copy2(side, tmp / side.name)
        os.chmod(tmp, 0o755 & ~_umask())
        _install(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_quant = sum(1 for item in items if item.dst_fmt != HP)
    return ConvertResult(out, names, len(weight_map), n_quant, total)


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
