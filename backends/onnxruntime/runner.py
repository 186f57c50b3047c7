"""Generation on an exported ``step.onnx`` with ONNX Runtime, behind the model interface of ``dsv3.runtime.generate``.

:class:`OnnxModel` looks like a :class:`~dsv3.model.graph.Transformer` to the generation loop: ``new_cache``,
``model(tokens, positions, cache)`` and ``logits``. Its forward already returns the logits (the graph
ends with the head), so ``logits`` is the identity; the generation code picks rows and positions from
whatever forward returns and never looks inside.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from dsv3 import __version__ as dsv3_version
from dsv3.backends.cpu_ref import basic
from dsv3.errors import Dsv3Error
from dsv3.model.config import load_config
from dsv3.model.graph import BuildOptions
from dsv3.tools.onnx_export import EXPORT_DTYPES, FORMAT_VERSION, GRAPH_FILE, MANIFEST, export_onnx

CACHE_ENV = "DSV3_ONNX_CACHE"
_NP_DTYPES = {"float32": np.float32, "float16": np.float16}


class OnnxCache:
    """The latent caches of one generation: ``tensors[name] (B, S, C or R)`` numpy, replaced each step."""

    def __init__(self, tensors: dict[str, np.ndarray], max_batch: int, max_len: int):
        self.tensors, self.max_batch, self.max_len = tensors, max_batch, max_len


class OnnxModel:
    """An exported graph in an onnxruntime session, with the model interface generation uses."""

    def __init__(self, export_dir: Path, config: str | Path | None = None, threads: int | None = None):
        import onnxruntime as ort

        self.export_dir = Path(export_dir)
        try:
            self.manifest = json.loads((self.export_dir / MANIFEST).read_text())
        except (OSError, ValueError) as exc:
            raise Dsv3Error(f"{self.export_dir / MANIFEST}: cannot read the export manifest ({exc})") from None
        if self.manifest.get("format_version") != FORMAT_VERSION:
            raise Dsv3Error(
                f"{self.export_dir / MANIFEST}: export format {self.manifest.get('format_version')!r}, "
                f"this dsv3 reads {FORMAT_VERSION}; export again"
            )
        cfg = load_config(config if config is not None else self.export_dir / "config.json")
        # the graph's RoPE table stops at max_len: generation's length check uses this limit
        self.cfg = dataclasses.replace(cfg, max_position_embeddings=self.manifest["max_len"])
        self.dtype = self.manifest["dtype"]
        self.opts = BuildOptions(EXPORT_DTYPES[self.dtype], "cpu", "absorb")
        self.embed = torch.empty(0, dtype=self.opts.dtype)  # where generation reads the device from
        self.mtp: list = []  # the MTP module is not exported: no speculative decoding
        self.no_mtp_reason = "the ONNX export drops the MTP module: no speculative decoding on onnxruntime"
        self.ops = SimpleNamespace(backend="onnxruntime", sample=basic.sample, fallbacks=[])
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(self.export_dir / GRAPH_FILE), options, providers=["CPUExecutionProvider"]
        )
        self.cache_names = self.manifest["inputs"][2:]

    # ------------------------------------------------------------ the Transformer interface
    def new_cache(self, max_batch: int, max_len: int) -> OnnxCache:
        """Zeroed caches ``kv_i (B, S, C)``, ``pe_i (B, S, R)`` in the exported dtype."""
        m, dt = self.manifest, _NP_DTYPES[self.dtype]
        widths = {"kv": m["kv_lora_rank"], "pe": m["qk_rope_head_dim"]}
        tensors = {n: np.zeros((max_batch, max_len, widths[n.split("_")[0]]), dt) for n in self.cache_names}
        return OnnxCache(tensors, max_batch, max_len)

    def __call__(self, tokens, positions=None, cache: OnnxCache | None = None, rows=None) -> torch.Tensor:
        """tokens (B, T) int64, positions (B, T) -> logits (B, T, V) float32; writes the cache.

        Without a cache, positions default to 0..T-1 and a fresh cache holds just this sequence.
        """
        if rows is not None:
            raise Dsv3Error("the onnxruntime backend runs one cache per batch row (no cache-row remapping)")
        tokens = torch.as_tensor(tokens, dtype=torch.long)
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t).expand(b, t)
        if cache is None:
            cache = self.new_cache(b, int(positions.max()) + 1)
        feeds = {"tokens": tokens.numpy(), "positions": positions.to(torch.long).contiguous().numpy()}
        if b != cache.max_batch:  # a smaller batch uses the first rows of the cache
            feeds.update({n: v[:b] for n, v in cache.tensors.items()})
        else:
            feeds.update(cache.tensors)
        out = self.session.run(None, feeds)
        for name, value in zip(self.cache_names, out[1:], strict=True):
            if b != cache.max_batch:
                cache.tensors[name][:b] = value
            else:
                cache.tensors[name] = value
        return torch.from_numpy(out[0])

    forward = __call__

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Identity: the graph's output already is the logits (B, T, V) float32."""
        return x

    def eval(self) -> OnnxModel:
        return self


def is_export_dir(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / GRAPH_FILE).is_file()


def cache_root() -> Path:
    """``$DSV3_ONNX_CACHE``, else ``$XDG_CACHE_HOME/dsv3/onnx``, else ``~/.cache/dsv3/onnx``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dsv3" / "onnx"


def export_key(path: Path, dtype: str, config: str | Path | None) -> str:
    """A hash of what the export depends on: the checkpoint files (name, size, mtime), dtype, versions."""
    h = hashlib.sha256()
    h.update(f"{path.resolve()}|{dtype}|{FORMAT_VERSION}|{dsv3_version}|{torch.__version__}".encode())
    for f in sorted(path.iterdir()):
        if f.is_file() and (f.suffix in (".safetensors", ".json")):
            st = f.stat()
            h.update(f"|{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if config is not None:
        h.update(Path(config).read_bytes())
    return h.hexdigest()[:16]


def load_whole_model(
    path: Path,
    dtype: str | torch.dtype = "float32",
    attn_impl: str = "absorb",
    act_quant: str = "none",
    config: str | Path | None = None,
    weight_format: str | None = None,
    parallel=None,
    progress: bool | None = None,
) -> OnnxModel:
    """The ``whole_model`` factory ``dsv3.load`` calls for this backend.

    path: an export directory (``dsv3 export onnx --out DIR``), run in the dtype it was exported in, or a
    checkpoint directory, exported on first use into ``cache_root()/<hash>`` (never into the checkpoint
    directory). bfloat16 (the CLI default) runs as float32: ONNX Runtime's CPU provider has no bfloat16 kernels.
    """
    if attn_impl != "absorb":
        raise Dsv3Error("backend onnxruntime runs the exported absorbed-MLA graph; --attn-impl naive is not available")
    if act_quant != "none" or weight_format is not None:
        raise Dsv3Error("backend onnxruntime runs high-precision exported weights (no --act-quant/--weight-format)")
    if parallel is not None and parallel.world_size > 1:
        raise Dsv3Error("backend onnxruntime runs in one process (no tensor/expert parallelism)")
    if not path.is_dir():
        raise Dsv3Error(f"{path}: checkpoint directory not found")
    name = str(dtype).removeprefix("torch.")
    if is_export_dir(path):
        model = OnnxModel(path, config)
        if name not in (model.dtype, "bfloat16"):  # bfloat16: the CLI default, not a request
            print(f"dsv3: {path} holds a {model.dtype} export: running in {model.dtype}, not {name}", file=sys.stderr)
        return model
    if name == "bfloat16":
        print("dsv3: backend onnxruntime runs bfloat16 as float32 (no bfloat16 CPU kernels)", file=sys.stderr)
        name = "float32"
    if name not in EXPORT_DTYPES:
        raise Dsv3Error(f"backend onnxruntime runs float32 or float16; got {dtype!r}")
    target = cache_root() / export_key(path, name, config)
    if not is_export_dir(target):
        print(f"dsv3: exporting {path} to ONNX in {target} (first use)", file=sys.stderr)
        try:
            export_onnx(path, target, dtype=name, config=config)
        except (Dsv3Error, OSError):
            if not is_export_dir(target):  # else another process exported it first
                raise
    return OnnxModel(target)  # the export holds the (overridden) config.json
