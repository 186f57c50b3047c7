"""Build and load the cpu backend's C kernels (``csrc/*.c``) with the machine's C compiler, once.

The library is compiled at first use with ``$CC`` (default ``cc``) for this machine's instruction set
(``-O3 -march=native``, falling back to plain ``-O3``; OpenMP when the compiler has it) into a cache
directory (``$DSV3_CACHE_DIR`` or ``~/.cache/dsv3``, then ``cpu-kernels/<hash of source and flags>``) and
loaded with ctypes. No torch headers are needed, so a build takes about a second. OpenMP: on Linux torch
ships its own ``libgomp.so.1``; the kernels' ``libgomp.so.1`` resolves to that already-loaded copy, so
both share one thread pool. Nothing happens at import: :func:`library` builds on its first call and
returns None (with :func:`unavailable_reason` saying why) when there is no working compiler.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

SOURCES = ("paged_mla.c",)
_CSRC = Path(__file__).resolve().parent / "csrc"
_state: dict[str, object] = {}

c_i64, c_int, c_float, c_void = ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_void_p

#: argtypes of each exported function, in the order of its C signature.
SIGNATURES: dict[str, list] = {
    "dsv3_mla_paged_attention": [
        c_void,  # q (B, T, H, C + R) float32
        c_void,  # cache
        c_i64,  # num_pages
        c_i64,  # page_size
        c_i64,  # entry_bytes
        c_int,  # kind: 0 float32, 1 bfloat16, 2 fp8 layout
        c_int,  # pe_bf16 (fp8 layout: roped key stored in bfloat16)
        c_int,  # round_kv (fp8 layout: dequantized latent rounded to bfloat16)
        c_void,  # lut (256,) float32 fp8 code values, or NULL
        c_void,  # block_table (B, M) int32
        c_i64,  # M
        c_void,  # seq_lens (B,) int32
        c_i64,  # B
        c_i64,  # T
        c_i64,  # H
        c_i64,  # C
        c_i64,  # R
        c_float,  # scale
        c_void,  # out (B, T, H, C) float32
        c_i64,  # head_chunks
        c_int,  # nthreads
    ],
}


def compiler() -> str | None:
    """The C compiler to use (``$CC`` or ``cc``), or None when there is none on PATH."""
    return shutil.which(os.environ.get("CC", "cc"))


def _cache_dir() -> Path:
    root = os.environ.get("DSV3_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "dsv3")
    return Path(root) / "cpu-kernels"


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try, best first: native ISA and OpenMP, then each dropped."""
    base = ["-O3", "-std=c11", "-shared", "-fPIC", "-fno-math-errno", "-ffp-contract=fast"]
    x86 = platform.machine() in ("x86_64", "AMD64")
    native = ["-march=native", "-mprefer-vector-width=512"] if x86 else ["-mcpu=native"]
    omp = ["-fopenmp"]
    return [base + native + omp, base + omp, base + native + ["-fopenmp-simd"], base]


def _build(cc: str) -> tuple[Path | None, str]:
    source = b"".join((_CSRC / name).read_bytes() for name in SOURCES)
    errors = []
    for flags in _flag_sets():
        key = hashlib.sha256(source + " ".join([cc, platform.machine(), *flags]).encode()).hexdigest()[:16]
        out = _cache_dir() / key / "libdsv3cpu.so"
        if out.exists():
            return out, ""
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            tmp_lib = Path(tmp) / out.name
            cmd = [cc, *flags, "-o", str(tmp_lib), *(str(_CSRC / name) for name in SOURCES), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode == 0:
                os.replace(tmp_lib, out)  # atomic: a concurrent build of the same key is harmless
                return out, ""
            errors.append(f"{' '.join(flags)}: {proc.stderr.strip().splitlines()[-1:] or proc.returncode}")
    return None, "; ".join(errors)


def library() -> ctypes.CDLL | None:
    """The loaded kernel library (built on first use), or None when it cannot be built or loaded."""
    if "lib" in _state:
        return _state["lib"]  # type: ignore[return-value]
    lib, reason = None, ""
    cc = compiler()
    if cc is None:
        reason = f"no C compiler ({os.environ.get('CC', 'cc')!r} not on PATH; set CC)"
    else:
        try:
            import torch  # noqa: F401  (loads torch's libgomp first, so the kernels share it)

            path, reason = _build(cc)
            if path is not None:
                lib = ctypes.CDLL(str(path))
                for name, argtypes in SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.argtypes, fn.restype = argtypes, c_int
        except OSError as exc:  # a failed load, an unwritable cache directory
            lib, reason = None, f"{type(exc).__name__}: {exc}"
    _state["lib"], _state["reason"] = lib, reason or None
    return lib


def unavailable_reason() -> str | None:
    """Why :func:`library` returned None (None before the first call or when it loaded)."""
    return _state.get("reason")  # type: ignore[return-value]
