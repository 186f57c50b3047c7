"""``mla_paged_attention`` reading the pages in place: a C kernel (``csrc/paged_mla.c``) walks each row's
block table and attends over every page where it lies, with a running-max softmax, instead of gathering a
``(B, S, C + R)`` copy of the batch's cache as cpu_ref does at every layer.

Same semantics as cpu_ref (the hookspec): only row b's first ``seq_lens[b]`` entries are read, query t
sees positions ``j <= seq_lens[b] - T + t``, float32 arithmetic, the output cast to the query's dtype.
Caches in float32 or bfloat16 (the compute dtype), or the FP8 layout of :mod:`dsv3.model.fp8_cache`.
"""

from __future__ import annotations

import ctypes

import torch

from dsv3.errors import Dsv3Error
from dsv3.model import fp8_cache

from . import native

#: Compute dtypes the kernel reads (the cache's dtype, or the roped key's in the FP8 layout).
DTYPES = (torch.float32, torch.bfloat16)
_KIND = {torch.float32: 0, torch.bfloat16: 1}
_luts: dict[torch.dtype, torch.Tensor] = {}


def _lut(fp8_dtype: torch.dtype) -> torch.Tensor:
    """(256,) float32: the value of every byte as an ``fp8_dtype`` code (NaN codes NaN), made once by torch."""
    if fp8_dtype not in _luts:
        _luts[fp8_dtype] = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(fp8_dtype).float().contiguous()
    return _luts[fp8_dtype]


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def mla_paged_attention(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """q_latent (B, T, H, C), q_pe (B, T, H, R) compute dtype, cache (P, page_size, C + R) compute dtype or
    fp8 (P, page_size, W), block_table (B, M) int32, seq_lens (B,) int32 -> (B, T, H, C) q_latent.dtype.

    A page id outside ``[0, P)`` among a row's pages, or a row longer than its block table, is a Dsv3Error.
    """
    lib = native.library()
    if cache.device.type != "cpu":
        raise Dsv3Error(f"mla_paged_attention (backend cpu): cache on {cache.device}, expected cpu tensors")
    b, t, h, c = q_latent.shape
    r = q_pe.shape[-1]
    q = torch.cat([q_latent, q_pe], dim=-1).float().contiguous()  # (B, T, H, C + R): one dot per score
    table = block_table.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    pages = cache.contiguous()  # the model's caches are contiguous already: no copy
    if fp8_cache.is_fp8_cache(pages):
        kind, lut = 2, _lut(pages.dtype)
        pe_bf16, round_kv = int(q_latent.dtype == torch.bfloat16), int(q_latent.dtype == torch.bfloat16)
        entry_bytes = pages.shape[-1]
    elif pages.dtype in _KIND:
        kind, lut, pe_bf16, round_kv = _KIND[pages.dtype], None, 0, 0
        entry_bytes = pages.shape[-1] * pages.element_size()
    else:
        raise Dsv3Error(
            f"mla_paged_attention (backend cpu): cache dtype {pages.dtype}; it reads float32, bfloat16, fp8"
        )
    out = torch.empty((b, t, h, c), dtype=torch.float32)
    threads = torch.get_num_threads()
    chunks = min(h, max(1, -(-threads // max(b, 1))))  # enough (row, head chunk) items for every thread
    rc = lib.dsv3_mla_paged_attention(
        _ptr(q),
        _ptr(pages),
        pages.shape[0],
        pages.shape[1],
        entry_bytes,
        kind,
        pe_bf16,
        round_kv,
        None if lut is None else _ptr(lut),
        _ptr(table),
        table.shape[1],
        _ptr(lens),
        b,
        t,
        h,
        c,
        r,
        ctypes.c_float(scale),
        _ptr(out),
        chunks,
        threads,
    )
    if rc:
        raise Dsv3Error(
            f"mla_paged_attention: block_table row {rc - 1} lists a page outside [0, {pages.shape[0]}) or "
            f"seq_lens[{rc - 1}] needs more than its {table.shape[1]} pages"
        )
    return out.to(q_latent.dtype)


def supports(request_dtype: torch.dtype) -> bool:
    """Whether the kernel serves a model of this compute dtype (its cache is that dtype, or FP8)."""
    return request_dtype in DTYPES
