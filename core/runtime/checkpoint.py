"""Reading Hugging Face-format checkpoints: safetensors only, checked tensor by tensor.

One table (``dsv3.model.names.hf_name``) maps the model's own parameter names to the checkpoint's. Routed
experts, stored one tensor per expert, are stacked into ``(E, out, in)`` at load.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from ..errors import Dsv3Error
from ..model.config import ModelConfig, check_regular_file, checkpoint_format, read_json_file
from ..model.names import hf_name
from ..model.parallel import ParallelContext, local_range, shard_dim
from ..weights import FP8_BLOCK, HP, INT8_W8A8, INT8_WO, Weight, fp8_scale_shape

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX = "model.safetensors.index.json"

_SCALE_SUFFIX = {FP8_BLOCK: "weight_scale_inv", INT8_W8A8: "weight_scale", INT8_WO: "weight_scale"}
#: safetensors dtype names of quantized weight data (such a weight is unusable without its scale).
_QUANT_DTYPE_NAMES = ("F8_E4M3", "F8_E5M2", "I8")


def inside_checkpoint(root: Path, name: str, what: str = "") -> Path:
    """``root / name`` once it is known to be a regular file inside the checkpoint directory ``root``.

    The name comes from the checkpoint (an index entry, a directory listing), so it is never trusted:
    an absolute path, ``..`` or a symlink leading out of the directory is a Dsv3Error naming ``what``
    (e.g. the index entry), as is a FIFO or a device (reading one would hang or never end). One way
    out is allowed: a Hugging Face cache snapshot (``.../snapshots/<rev>/``), whose files link into
    the same repository's ``blobs/``.
    """
    path, lead = root / name, f"{what} " if what else ""
    if Path(name).is_absolute():
        raise Dsv3Error(f"{root}: {lead}names an absolute path ({name}); a checkpoint names only its own files")
    try:
        target, home = path.resolve(), root.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise Dsv3Error(f"{path}: {lead}cannot be resolved ({exc})") from None
    homes = [home] + ([home.parent.parent / "blobs"] if home.parent.name == "snapshots" else [])
    if not any(target.is_relative_to(h) for h in homes):
        raise Dsv3Error(f"{path}: {lead}leads outside the checkpoint directory (to {target})")
    check_regular_file(path, what)
    return path


class CheckpointFiles:
    """The safetensors files of a checkpoint directory and which tensor lives where.

    Every tensor must be stored once: in the file the index names, or (without an index) in one of
    the ``*.safetensors`` files; a second copy anywhere is a Dsv3Error, not a silent "last file wins".
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise Dsv3Error(f"{self.path}: checkpoint directory not found")
        if not self.path.is_dir():
            raise Dsv3Error(f"{self.path}: not a directory (pass the checkpoint directory)")
        self.where: dict[str, Path] = {}
        self._handles: dict[Path, object] = {}
        index = self.path / INDEX
        if index.exists() or index.is_symlink():
            self._read_index(index)
        else:
            self._glob_files()

    def _read_index(self, index: Path) -> None:
        raw = read_json_file(inside_checkpoint(self.path, INDEX, "the index"), unique_keys=True)
        weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
        if not isinstance(weight_map, dict):
            got = (
                "no weight_map" if not isinstance(raw, dict) or "weight_map" not in raw else "a weight_map that is not"
            )
            raise Dsv3Error(f"{index}: {got} a mapping of tensor names to file names")
        files: dict[str, Path] = {}
        for tensor, fname in weight_map.items():
            what = f"{INDEX} entry for tensor {tensor}"
            if not isinstance(fname, str) or not fname:
                raise Dsv3Error(f"{index}: {what} must be a file name, got {fname!r}")
            if fname not in files:
                files[fname] = inside_checkpoint(self.path, fname, what)
            self.where[tensor] = files[fname]
        for file in files.values():  # each shard holds exactly the tensors the index gives it
            for tensor in self._header(file):
                listed = self.where.get(tensor)
                if listed is not None and listed != file:
                    raise Dsv3Error(
                        f"{file}: tensor {tensor} is also stored in {listed.name}; a tensor must be stored once"
                    )
        for tensor, file in self.where.items():
            if tensor not in self._header(file):
                raise Dsv3Error(f"{file}: listed in {INDEX} for tensor {tensor} but does not hold it")

    def _glob_files(self) -> None:
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            pickled = [p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES]
            if pickled:
                raise Dsv3Error(
                    f"{self.path / pickled[0]}: pickled weights are refused (they can run code); "
                    "convert the checkpoint to safetensors"
                )
            raise Dsv3Error(f"{self.path}: no model.safetensors or model.safetensors.index.json found")
        for file in files:
            file = inside_checkpoint(self.path, file.name, "safetensors file")
            for tensor in self._header(file):
                if tensor in self.where:
                    raise Dsv3Error(
                        f"{file}: tensor {tensor} is also stored in {self.where[tensor].name}; a tensor must be stored once"
                    )
                self.where[tensor] = file

    def _header(self, file: Path):
        """The names of the tensors in ``file`` (its header only: nothing is read)."""
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file].keys()

    @staticmethod
    def _open(file: Path):
        try:
            return safe_open(str(file), framework="pt")
        except Exception as exc:
            raise Dsv3Error(f"{file}: not a readable safetensors file ({str(exc).splitlines()[0]})") from None

    def keys(self) -> set[str]:
        return set(self.where)

    def shape(self, tensor: str) -> tuple[int, ...]:
        return tuple(self._handle(tensor).get_slice(tensor).get_shape())

    def dtype(self, tensor: str) -> str:
        """The safetensors dtype name of a tensor (``BF16``, ``F8_E4M3``, ``I8``...), read from the header."""
        return self._handle(tensor).get_slice(tensor).get_dtype()

    def _handle(self, tensor: str):
        file = self.where[tensor]
        if file not in self._handles:
            self._handles[file] = self._open(file)
        return self._handles[file]

    def get(self, tensor: str) -> torch.Tensor:
        try:
            return self._handle(tensor).get_tensor(tensor)
        except Dsv3Error:
            raise
        except Exception as exc:
            raise Dsv3Error(f"{self.where[tensor]}: cannot read tensor {tensor} ({str(exc).splitlines()[0]})") from None

    def get_slice(self, tensor: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """``tensor[..., start:stop, ...]`` along ``dim`` as a compact copy: only those bytes are read."""
        try:
            part = self._handle(tensor).get_slice(tensor)
            index = tuple(slice(start, stop) if d == dim else slice(None) for d in range(len(part.get_shape())))
            return part[index].clone(memory_format=torch.contiguous_format)
        except Dsv3Error:
            raise
        except Exception as exc:
            raise Dsv3Error(f"{self.where[tensor]}: cannot read tensor {tensor} ({str(exc).splitlines()[0]})") from None

    def nbytes(self) -> int:
        return sum(f.stat().st_size for f in set(self.where.values()))

    def close(self) -> None:
        """Drop the open files; their memory maps go once no tensor views them (reopened on demand)."""
        self._handles.clear()


def format_of_checkpoint(files: CheckpointFiles, cfg: ModelConfig):
    """Return ``(fmt_of(module_path) -> format, scale suffix)`` for a checkpoint.

    A linear is quantized when its scale tensor is present (``weight_scale_inv`` for fp8,
    ``weight_scale`` for int8); its format comes from ``quantization_config`` (see
    ``dsv3.model.config.checkpoint_format``). A quantized weight without its scale, or scales in a
    checkpoint whose config has no quantization_config, is a Dsv3Error naming the tensor.
    """
    keys = files.keys()
    quant = cfg.quantization
    fmt_q = checkpoint_format(quant, cfg.source)
    suffix = _SCALE_SUFFIX.get(fmt_q, _SCALE_SUFFIX[FP8_BLOCK])

    def fmt_of(module_path: str) -> str:
        weight = hf_name(module_path + ".weight", cfg, suffix).replace("{e}", "0")
        if quant is None:
            for other in sorted(set(_SCALE_SUFFIX.values())):
                scale = hf_name(module_path + ".scale", cfg, other).replace("{e}", "0")
                if scale in keys:
                    raise Dsv3Error(
                        f"{files.where[scale]}: scale tensor {scale} found but {cfg.source} has no quantization_config"
                    )
        else:
            scale = hf_name(module_path + ".scale", cfg, suffix).replace("{e}", "0")
            if scale in keys:
                return fmt_q
        if weight in keys and files.dtype(weight) in _QUANT_DTYPE_NAMES:
            wanted = suffix if quant is not None else "weight_scale_inv or weight_scale"
            raise Dsv3Error(
                f"{files.where[weight]}: missing scale tensor ({wanted}) for {files.dtype(weight)} weight {weight}"
            )
        return HP

    return fmt_of, suffix


def load_weights(
    model: torch.nn.Module,
    files: CheckpointFiles,
    cfg: ModelConfig,
    quant_suffix: str,
    device: str | torch.device,
    dtype: torch.dtype,
    progress: bool | None = None,
    converted: dict[str, tuple[str, str]] | None = None,
    convert_weight=None,
    parallel: ParallelContext | None = None,
) -> None:
    """Fill ``model`` (built on the meta device) from the checkpoint, checking every tensor.

    converted: module path -> (checkpoint format, model format) for linears the backend converts
        at load (``BackendInfo.convert_formats``); ``convert_weight`` does it, one matrix at a time.
    parallel: with a world of several ranks, each reads only its part straight from the checkpoint:
        its rows or columns of split tensors (safetensors slices) and only its own routed experts.
    Raises Dsv3Error naming the first missing, misshapen or surplus tensor.
    """
    par = parallel or ParallelContext()
    expected = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    expected = {k: v for k, v in expected.items() if not k.startswith("rope_")}
    used: set[str] = set()
    state: dict[str, torch.Tensor] = {}
    n_experts = cfg.n_routed_experts
    bar = tqdm(
        expected.items(), desc="loading weights", unit="tensor", disable=None if progress is None else not progress
    )
    for name, meta in bar:
        module, _, leaf = name.rpartition(".")
        if converted and module in converted:
            if leaf == "weight":  # its scale (if the target format has one) comes out of the conversion
                src_fmt, dst_fmt = converted[module]
                metas = {k: expected[f"{module}.{k}"] for k in ("weight", "scale") if f"{module}.{k}" in expected}
                args = (files, cfg, quant_suffix, module, src_fmt, dst_fmt, convert_weight, metas, device, used)
                state.update(_load_converted(*args, par=par))
            continue
        src = hf_name(name, cfg, quant_suffix)
        names = [src.format(e=e) for e in range(n_experts)] if "{e}" in src else [src]
        mine = names[slice(*par.local(len(names)))] if "{e}" in src else names  # expert parallelism
        parts = []
        for hf in names:
            if hf not in files.where:
                what = "scale tensor" if hf.endswith(("_scale_inv", "_scale")) else "tensor"
                raise Dsv3Error(f"{files.path}: missing {what} {hf}")
            if hf in mine:
                parts.append(_read_part(files, cfg, name, hf, par, split="{e}" not in src))
            used.add(hf)
        if "{e}" in src:  # check experts one by one: name the misshapen one, never let torch.stack fail
            for hf, part in zip(mine, parts, strict=True):
                if tuple(part.shape) != tuple(meta.shape[1:]):
                    want = list(meta.shape[1:])
                    raise Dsv3Error(f"{files.where[hf]}: tensor {hf} has shape {list(part.shape)}, expected {want}")
        tensor = torch.stack(parts) if len(names) > 1 or "{e}" in src else parts[0]
        if tuple(tensor.shape) != tuple(meta.shape):
            shown = names[0] if len(names) == 1 else f"{names[0]} (and the other experts)"
            got = tuple(parts[0].shape) if len(names) > 1 else tuple(tensor.shape)
            want = tuple(meta.shape[1:]) if len(names) > 1 else tuple(meta.shape)
            raise Dsv3Error(f"{files.where[names[0]]}: tensor {shown} has shape {list(got)}, expected {list(want)}")
        if meta.dtype in (torch.float8_e4m3fn, torch.int8):
            if tensor.dtype != meta.dtype:
                raise Dsv3Error(
                    f"{files.where[names[0]]}: tensor {names[0]} has dtype {tensor.dtype}, expected {meta.dtype}"
                )
        elif not tensor.is_floating_point():
            raise Dsv3Error(f"{files.where[names[0]]}: tensor {names[0]} has dtype {tensor.dtype}, expected a float")
        state[name] = tensor.to(device=device, dtype=meta.dtype)
        if par.world_size > 1:  # unmap the files: the pages this rank touched leave its resident memory
            files.close()
    surplus = sorted(files.keys() - used)
    if surplus:
        more = f" (and {len(surplus) - 1} more)" if len(surplus) > 1 else ""
        raise Dsv3Error(f"{files.path}: unexpected tensor {surplus[0]}{more} does not fit the config")
    model.load_state_dict(state, strict=False, assign=True)
    if par.world_size > 1:
        files.close()
    for name in ("rope_cos", "rope_sin"):
        setattr(model, name, getattr(model, name).to(device))


def _read_part(
    files: CheckpointFiles, cfg: ModelConfig, name: str, hf: str, par: ParallelContext, split: bool
) -> torch.Tensor:
    """This rank's part of checkpoint tensor ``hf`` (model tensor ``name``): all of it in one process.

    A part holding a NaN or an infinity is a Dsv3Error naming the tensor (see ``has_nonfinite``).
    """
    part = _read_part_unchecked(files, cfg, name, hf, par, split)
    if has_nonfinite(part):
        raise Dsv3Error(f"{files.where[hf]}: tensor {hf} contains NaN or infinite values")
    return part


def _read_part_unchecked(
    files: CheckpointFiles, cfg: ModelConfig, name: str, hf: str, par: ParallelContext, split: bool
) -> torch.Tensor:
    if par.world_size == 1:
        return files.get(hf)
    dim = shard_dim(name) if split else None
    if dim is None:  # replicated: copied so that no model tensor keeps the file mapped
        return files.get(hf).clone()
    full = files.shape(hf)
    weight_size = None
    if name.endswith(".scale") and len(full) == 2:  # fp8 block scale: cut where its weight is cut
        weight_size = files.shape(hf_name(name[: -len("scale")] + "weight", cfg))[dim]
    rng = local_range(name, hf, full, par, weight_size)
    return files.get(hf).clone() if rng is None else files.get_slice(hf, *rng)


def has_nonfinite(t: torch.Tensor) -> bool:
    """Whether ``t`` holds a NaN or an infinity, in one reduction pass without a temporary of its size.

    Floats: a NaN or an infinity makes the sum non-finite, and a sum of finite values overflows only
    past the dtype's range, so the exact (slower) elementwise test runs only then. Measured here on a
    16M-element bf16 tensor: the sum takes 0.2 ns per element, ``isfinite().all()`` 12 ns, a copy 2 ns.
    fp8 e4m3fn has no infinities and two NaN bytes, 0x7F and 0xFF: the largest byte seen as uint8 is
    0xFF, or seen as int8 is 0x7F, exactly when one is present. Integer weights are always finite.
    """
    if t.numel() == 0 or not t.is_floating_point():
        return False
    if t.dtype == torch.float8_e4m3fn:
        return int(t.view(torch.uint8).max()) == 0xFF or int(t.view(torch.int8).max()) == 0x7F
    if t.element_size() == 1:  # another fp8 kind (e5m2 has infinities): exact, through float32
        return not bool(torch.isfinite(t.float()).all())
    return not bool(t.sum().isfinite()) and not bool(torch.isfinite(t).all())


def check_layers_present(files: CheckpointFiles, cfg: ModelConfig) -> None:
    """A Dsv3Error unless the checkpoint holds tensors of every layer the config declares.

    Checked before the model is built: a config is not trusted to say how big the model is (the layer
    count decides how many modules are built, and 10**6 layers took hours before the first missing
    tensor was noticed). The tensors' shapes are checked one by one as they are read.
    """
    found = {int(m.group(1)) for key in files.keys() if (m := re.match(r"model\.layers\.(\d+)\.", key))}
    needed = cfg.num_hidden_layers + cfg.num_nextn_predict_layers
    missing = next((i for i in range(needed) if i not in found), None)
    if missing is not None:
        mtp = f" + {cfg.num_nextn_predict_layers} MTP" if cfg.num_nextn_predict_layers else ""
        raise Dsv3Error(
            f"{cfg.source}: {cfg.num_hidden_layers}{mtp} layers declared but {files.path} holds no tensor of layer "
            f"{missing} (model.layers.{missing}.*)"
        )


def _load_converted(
    files: CheckpointFiles,
    cfg: ModelConfig,
    quant_suffix: str,
    module: str,
    src_fmt: str,
    dst_fmt: str,
    convert_weight,
    metas: dict[str, torch.Tensor],
    device: str | torch.device,
    used: set[str],
    par: ParallelContext | None = None,
) -> dict[str, torch.Tensor]:
    """Read one linear stored in ``src_fmt`` and convert it to ``dst_fmt``, one (out, in) matrix at a time.

    Stacked experts are converted expert by expert, so the float32 working copy is one matrix.
    Returns the model's ``{module.weight, module.scale}`` tensors on ``device``.
    """
    w_src = hf_name(f"{module}.weight", cfg, quant_suffix)
    s_src = hf_name(f"{module}.scale", cfg, quant_suffix)
    stacked = "{e}" in w_src
    experts = range(cfg.n_routed_experts) if stacked else [None]
    par = par or ParallelContext()
    mine = range(*par.local(cfg.n_routed_experts)) if stacked else experts  # expert parallelism
    out_f, in_f = metas["weight"].shape[-2:]
    scale_shape = fp8_scale_shape(out_f, in_f) if src_fmt == FP8_BLOCK else (out_f,)
    storage = torch.float8_e4m3fn if src_fmt == FP8_BLOCK else torch.int8
    datas, scales = [], []
    for e in experts:
        w_name, s_name = (w_src.format(e=e), s_src.format(e=e)) if stacked else (w_src, s_src)
        for hf in (w_name, s_name):
            if hf not in files.where:
                what = "scale tensor" if hf == s_name else "tensor"
                raise Dsv3Error(f"{files.path}: missing {what} {hf}")
        used.update((w_name, s_name))
        if e not in mine:
            continue
        data = _read_part(files, cfg, f"{module}.weight", w_name, par, split=not stacked)
        scale = _read_part(files, cfg, f"{module}.scale", s_name, par, split=not stacked)
        for hf, t, want in ((w_name, data, (out_f, in_f)), (s_name, scale, scale_shape)):
            if tuple(t.shape) != tuple(want):
                raise Dsv3Error(f"{files.where[hf]}: tensor {hf} has shape {list(t.shape)}, expected {list(want)}")
        if data.dtype != storage:
            raise Dsv3Error(f"{files.where[w_name]}: tensor {w_name} has dtype {data.dtype}, expected {storage}")
        w = convert_weight(Weight(data, src_fmt, scale.float()), dst_fmt)
        if w.fmt != dst_fmt or tuple(w.data.shape) != (out_f, in_f):
            raise Dsv3Error(
                f"{files.where[w_name]}: converting {w_name} to {dst_fmt} gave {w.fmt} {list(w.data.shape)}"
            )
        datas.append(w.data)
        scales.append(w.scale)
    out = {f"{module}.weight": (torch.stack(datas) if stacked else datas[0]).to(device, metas["weight"].dtype)}
    if "scale" in metas:
        out[f"{module}.scale"] = (torch.stack(scales) if stacked else scales[0]).to(device, metas["scale"].dtype)
    return out


def iter_linear_modules(model: torch.nn.Module) -> Iterable[tuple[str, torch.nn.Module]]:
    from ..model.graph import Linear

    return ((n, m) for n, m in model.named_modules() if isinstance(m, Linear))


def apply_scale_fmt_and_prepare(model: torch.nn.Module, scale_fmt: str | None, prepare) -> None:
    """Set each quantized linear's scale format and let the backend convert its weight once."""
    for _, lin in iter_linear_modules(model):
        if lin.fmt == HP:
            continue
        lin.scale_fmt = scale_fmt
        if prepare is not None:
            w: Weight = prepare(lin.as_weight())
            if w is not None:
                lin.weight, lin.scale = w.data, w.scale


def share_mtp_duplicates(model) -> None:
    """The MTP layers store copies of the embedding and output head: keep one tensor when equal."""
    for mtp in model.mtp:
        if mtp.embed.shape == model.embed.shape and torch.equal(mtp.embed, model.embed):
            mtp.embed = model.embed
        if (
            mtp.head.fmt == HP
            and mtp.head.weight.shape == model.head.weight.shape
            and torch.equal(mtp.head.weight, model.head.weight)
        ):
            mtp.head.weight = model.head.weight
