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

Nothing dsv3 did not make is destroyed: ``--force`` replaces only an empty directory, one that
looks like a checkpoint (``CHECKPOINT_FILES``) or one a conversion wrote (its ``MARKER`` lists the
files). The temporary directory carries a marker with the owning process, so a later run removes
one left by a killed conversion, and only once that process is gone.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import glob
import json
import os
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from tqdm import tqdm

from ..errors import Dsv3Error
from ..model.config import load_config
from ..quantize import dequantize, quantization_config, quantize_weight
from ..runtime.checkpoint import PICKLE_SUFFIXES, CheckpointFiles, inside_checkpoint
from ..weights import FP8_BLOCK, FP8_BLOCK_SIZE, HP, INT8_W8A8, INT8_WO, Weight, fp8_scale_shape

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

#: Written into every output (state "complete", with the files written) and into the temporary
#: directories of a conversion in progress (state "partial", with its process id and host).
MARKER = ".dsv3-convert.json"
_WRITTEN_BY = "dsv3 convert"
#: What a checkpoint directory holds: ``--force`` replaces one holding only these (plus config.json
#: and a .safetensors file), never a directory with anything else in it.
CHECKPOINT_FILES = (
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "chat_template.*",
    "*.jinja",
    "*.py",
    "README*",
    "LICENSE*",
    ".gitattributes",
    MARKER,
)


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
    if out.is_symlink():
        raise Dsv3Error(f"--out {out}: is a symbolic link; give the directory itself")
    above = next(p for p in (out, *out.parents) if p.exists() or p == p.parent)
    if above != out and not above.is_dir():
        raise Dsv3Error(f"--out {out}: {above} is not a directory")
    if out.exists() and not out.is_dir():
        raise Dsv3Error(f"--out {out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise Dsv3Error(f"--out {out}: exists and is not empty (pass --force to replace it)")
        why = _not_replaceable(out)
        if why is not None:
            raise Dsv3Error(f"--out {out}: {why}; --force replaces only a checkpoint or a dsv3 convert output")


def _read_marker(directory: Path) -> dict | None:
    """The marker a conversion wrote in ``directory``, or None (absent, unreadable or not dsv3's)."""
    path = directory / MARKER
    try:
        if path.is_symlink() or not path.is_file():
            return None
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("written_by") == _WRITTEN_BY else None


def _write_marker(directory: Path, state: str, **fields) -> None:
    info = {"written_by": _WRITTEN_BY, "state": state, **fields}
    (directory / MARKER).write_text(json.dumps(info, indent=2) + "\n")


def _not_replaceable(out: Path) -> str | None:
    """Why ``--force`` must not replace the non-empty directory ``out`` (None: it may)."""
    entries = sorted(out.iterdir())
    marker = _read_marker(out)
    written = set(marker.get("files") or ()) | {MARKER} if marker and marker.get("state") == "complete" else set()
    for p in entries:
        if p.is_symlink() or not p.is_file():
            return f"holds {p.name}, which is not a regular file"
        if p.name not in written and not any(fnmatch.fnmatchcase(p.name, pat) for pat in CHECKPOINT_FILES):
            return f"holds {p.name}, which is not part of a checkpoint"
    if {p.name for p in entries} <= written:
        return None  # exactly what an earlier conversion wrote
    if not (out / "config.json").is_file() or not any(p.name.endswith(".safetensors") for p in entries):
        return "does not look like a checkpoint (no config.json and .safetensors files)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True


def _remove_stale(out: Path) -> None:
    """Remove temporary directories of earlier conversions into ``out`` whose process is gone.

    Only a directory holding this module's marker, written on this host by a process that no longer
    exists, is removed; the name only narrows the search.
    """
    host = socket.gethostname()
    for p in out.parent.glob(f".{glob.escape(out.name)}.*"):
        if p.is_symlink() or not p.is_dir():
            continue
        marker = _read_marker(p)
        if marker is None or marker.get("state") != "partial" or marker.get("host") != host:
            continue
        pid = marker.get("pid")
        if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            print(f"dsv3: removed {p}, left by an interrupted conversion (process {pid})", file=sys.stderr)


def _new_partial(out: Path, suffix: str = ".partial") -> Path:
    """An empty temporary directory next to ``out``, marked with this process."""
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=suffix, dir=out.parent))
    except OSError as exc:
        raise Dsv3Error(f"--out {out}: cannot create a directory in {out.parent}: {exc.strerror or exc}") from None
    try:
        _write_marker(tmp, "partial", pid=os.getpid(), host=socket.gethostname())
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp


def _make_parents(out: Path) -> list[Path]:
    """Create the missing parents of ``out``; the ones created, deepest first (to remove on failure)."""
    missing = [p for p in out.parents if not p.exists()]
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        _remove_empty(missing)
        raise Dsv3Error(f"--out {out}: cannot create {exc.filename or out.parent}: {exc.strerror or exc}") from None
    return missing


def _remove_empty(directories: list[Path]) -> None:
    for p in directories:
        with contextlib.suppress(OSError):
            p.rmdir()


@contextlib.contextmanager
def _file_size_limit_as_error() -> Iterator[None]:
    """Writing past RLIMIT_FSIZE raises EFBIG instead of killing the process (SIGXFSZ's default)."""
    sig = getattr(signal, "SIGXFSZ", None)
    if sig is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


def _save_shard(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file, with its I/O failures as OSError (safetensors reports them as SafetensorError text)."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        m = re.search(r"os error (\d+)", str(exc))
        if m is None:  # not an I/O failure
            raise
        code = int(m.group(1))
        raise OSError(code, os.strerror(code), str(path)) from None


def _write_failure(out: Path, exc: OSError) -> str:
    """One line for an OSError while writing ``out``: which file, what went wrong."""
    what = exc.strerror or str(exc)
    if exc.errno == errno.EFBIG:
        what += " (the file size limit, see ulimit -f)"
    name = exc.filename
    if name is not None:
        p = Path(name)
        if p.parent.parent == out.parent and p.parent.name.startswith(f".{out.name}."):
            name = out / p.name  # the file it was to become, not its temporary name
    where = f" {name}:" if name is not None else ""
    return f"--out {out}:{where} {what}; nothing was written"


def _resolves_inside(root: Path, link: Path) -> bool:
    try:
        return link.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a link loop
        return False


def _side_files(src: Path) -> list[Path]:
    """Top-level files to copy unchanged: tokenizer, generation config, chat template, model code."""
    keep = []
    for p in sorted(src.iterdir()):
        if p.name.startswith(".") or (p.is_dir() and not p.is_symlink()):
            continue
        if p.name == "config.json" or p.name.endswith((".safetensors", ".safetensors.index.json")):
            continue
        if p.suffix in PICKLE_SUFFIXES:
            continue
        if p.is_symlink() and not p.exists() and _resolves_inside(src, p):
            continue  # a dangling link inside the checkpoint (e.g. a partial snapshot): nothing to copy
        keep.append(inside_checkpoint(src, p.name))  # a link out or a device is refused, not copied or skipped
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
    """Move the finished temporary directory to ``out`` (replacing an old ``out`` only at the end).

    The old ``out`` is first moved, untouched, into a marked temporary directory, so that a run killed
    before it is removed leaves something the next run cleans up.
    """
    if not out.exists():
        tmp.rename(out)
        return
    trash = _new_partial(out, ".old")
    out.rename(trash / out.name)
    try:
        tmp.rename(out)
    except BaseException:
        (trash / out.name).rename(out)
        shutil.rmtree(trash, ignore_errors=True)
        raise
    shutil.rmtree(trash, ignore_errors=True)


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
    force: replace a non-empty ``out`` that holds a checkpoint or an earlier conversion's output, nothing
        else (never the input, never a directory holding the input).
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
    side = _side_files(src)
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

    made = _make_parents(out)
    try:
        with _file_size_limit_as_error():
            _remove_stale(out)
            tmp = _new_partial(out)
            try:
                weight_map = _write_shards(tmp, files, shards, names, hp_dtype, scale_fmt, total, to, progress)
                index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
                index = index if len(shards) > 1 else None
                _write_the_rest(tmp, side, _new_config(raw, dst_fmt, hp_dtype, scale_fmt), index, to)
                _install(tmp, out)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except BaseException as exc:
        _remove_empty(made)
        if isinstance(exc, OSError):
            raise Dsv3Error(_write_failure(out, exc)) from None
        raise
    n_quant = sum(1 for item in items if item.dst_fmt != HP)
    return ConvertResult(out, names, len(weight_map), n_quant, total)


def _write_shards(
    tmp: Path,
    files: CheckpointFiles,
    shards: list[list[_Item]],
    names: list[str],
    hp_dtype: torch.dtype,
    scale_fmt: str | None,
    total: int,
    to: str,
    progress: bool | None,
) -> dict[str, str]:
    """Convert and write every output shard into ``tmp``; the weight map (tensor name -> file name)."""
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
            _save_shard(tensors, tmp / fname)
            del tensors
    return weight_map


def _write_the_rest(tmp: Path, side: list[Path], config: dict, index: dict | None, to: str) -> None:
    """After the shards: the index (None: a single shard), config.json, the side files, and the marker last."""
    if index is not None:
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for file in side:
        shutil.copy2(file, tmp / file.name)
    written = sorted(p.name for p in tmp.iterdir() if p.name != MARKER)
    _write_marker(tmp, "complete", to=to, files=written)
    os.chmod(tmp, 0o755 & ~_umask())


def _disable(progress: bool | None) -> bool | None:
    return None if progress is None else not progress


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
