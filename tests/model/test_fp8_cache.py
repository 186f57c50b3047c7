"""The FP8 latent cache (``--kv-cache-dtype fp8``): its layout and rounding, the model's use of it, the flags'
refusals, the bytes reported, and its numerics on the embedded model (docs/model-numerics.md, row 19).

Band, derived from the format before measuring: the cache rounds each latent value once per layer to e4m3
(3 mantissa bits: relative error up to 2^-4, as FP8 weights, whose row has mean KL <= 2e-2 and top-1
>= 91 %, applied at every linear); the roped key is exact. So the same band: mean KL(bf16 cache || fp8
cache) <= 2e-2 and top-1 >= 91 %; and >= 1e-4, bf16 rounding's floor: a cache closer than that was not
quantized (a silent fall back to the compute dtype gives exactly 0).
"""

from __future__ import annotations

import dataclasses
import inspect
import sched

import pytest
import torch

import dsv3
from dsv3.commands.serve import cache_bytes
from dsv3.errors import Dsv3Error
from dsv3.hookspecs import BackendInfo
from dsv3.model import fp8_cache
from dsv3.tools.bench import dsv3_kv_bytes, kv_bytes_671b
from dsv3.tools.eval import evaluate

FP8_MAX_KLD, FP8_MIN_KLD, FP8_MIN_TOP1 = 2e-2, 1e-4, 91.0


@pytest.fixture(scope="module")
def engine():
    return dsv3.load(dtype="bfloat16", progress=False)


def test_bytes_per_token_at_the_671b_shape_are_flashmlas():
    assert fp8_cache.entry_bytes(512, 64, torch.bfloat16) == 656  # 512 e4m3 + 4 float32 scales + 64 bf16
    assert fp8_cache.entry_bytes(512, 64, torch.float32) == 784
    at = kv_bytes_671b()
    assert at["auto"]["bytes_per_token_per_layer"] == 1152 and at["fp8"]["bytes_per_token_per_layer"] == 656
    assert at["fp8"]["bytes_per_token"] == 656 * 61


def test_rounding_is_e4m3_per_128_value_tile():
    # tiles of very different magnitudes in one token: each keeps e4m3's relative precision (a per-token
    # scale would push the small tile into subnormals or zero)
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(3, 384, generator=g) * torch.tensor([1e-3] * 128 + [1.0] * 128 + [1e3] * 128)
    pe = torch.randn(3, 16, generator=g)
    for fp8 in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        latent, rope = fp8_cache.decode_entries(fp8_cache.encode_entries(kv, pe, fp8), 384, torch.float32)
        assert torch.equal(rope, pe)  # the roped key is stored as is
        s = kv.abs().view(3, 3, 128).amax(-1).repeat_interleave(128, -1) / fp8_cache.FP8_MAX[fp8]
        # half a step: 2^-4 relative for normals, half the smallest subnormal step (2^-9 or 2^-10 of s) below
        bound = torch.maximum(kv.abs() * 2.0**-4, s * 2.0**-9) * (1 + 1e-6)
        assert ((latent - kv).abs() <= bound).all()
        assert (latent != kv).any()  # it was rounded


def test_non_finite_values_read_back_nan_for_their_tile_only():
    kv = torch.ones(2, 256)
    kv[0, 3], kv[1, 200] = float("nan"), float("-inf")
    latent, _ = fp8_cache.decode_entries(
        fp8_cache.encode_entries(kv, torch.zeros(2, 4), torch.float8_e4m3fn), 256, torch.float32
    )
    assert latent[0, :128].isnan().all() and (latent[0, 128:] == 1).all()
    assert latent[1, 128:].isnan().all() and (latent[1, :128] == 1).all()


def test_new_cache_allocates_the_fp8_layout_and_reports_its_bytes(engine):
    model = engine.model
    c, r, layers = model.cfg.kv_lora_rank, model.cfg.qk_rope_head_dim, len(model.layers)
    cache = model.new_cache(2, 70, kv_cache_dtype="fp8")
    width = c + 4 * -(-c // 128) + 2 * r
    assert cache.main[0].pages.dtype == torch.float8_e4m3fn and cache.main[0].pages.shape[-1] == width
    assert cache.nbytes_per_token() == width * layers
    assert model.new_cache(1, 1).nbytes_per_token() == (c + r) * 2 * layers
    n_attn = layers + len(model.mtp)
    assert cache_bytes(model, 1, 1) == (c + r) * 2 * n_attn
    model.set_kv_cache_dtype("fp8")
    try:
        assert cache_bytes(model, 1, 1) == width * n_attn  # the serve start-up line's bytes per position
        kv = dsv3_kv_bytes(engine, "cpu_ref", torch.bfloat16)
        assert kv["absorb_fp8"]["bytes_per_token_per_layer"] == width
        assert kv["absorb"]["bytes_per_token_per_layer"] == (c + r) * 2
    finally:
        model.set_kv_cache_dtype("auto")


def test_refusals_name_the_flag_and_the_backend(engine):
    model = engine.model
    with pytest.raises(Dsv3Error, match="unknown --kv-cache-dtype 'int4'"):
        model.set_kv_cache_dtype("int4")
    saved = model.backend_info
    model.backend_info = BackendInfo(name="oldvendor", description="a v3 plugin", contract_version=3)
    model.ops = dataclasses.replace(saved_ops := model.ops, backend="oldvendor")
    try:
        with pytest.raises(Dsv3Error, match=r"--kv-cache-dtype fp8: backend oldvendor has no fp8 latent cache"):
            model.set_kv_cache_dtype("fp8")
        assert model.new_cache(1, 1).main[0].pages.dtype == torch.bfloat16  # auto still runs on it
    finally:
        model.backend_info = saved
        model.ops = saved_ops
    with pytest.raises(Dsv3Error, match="--kv-cache-dtype fp8 needs the absorbed MLA form"):
        dsv3.load(dtype="bfloat16", attn_impl="naive", kv_cache_dtype="fp8", progress=False)
    from dsv3.tools.onnx_export import with_export_ops

    model.set_kv_cache_dtype("fp8")
    try:
        with pytest.raises(Dsv3Error, match="ONNX export keeps its own"):
            with_export_ops(model)
    finally:
        model.set_kv_cache_dtype("auto")


def _logits_through_cache(model, kind: str, chunk: int):
    @torch.inference_mode()
    def logits(tokens: torch.Tensor) -> torch.Tensor:
        b, t = tokens.shape
        cache = model.new_cache(b, t, kv_cache_dtype=kind)
        out = []
        for s in range(0, t, chunk):  # chunked prefill: every chunk attends over the cache as written
            pos = torch.arange(s, min(t, s + chunk)).expand(b, -1)
            out.append(model.logits(model(tokens[:, s : s + chunk], pos, cache)))
        return torch.cat(out, 1)

    return logits


@pytest.mark.parametrize("chunk", [256, 16], ids=["prefill", "chunks-of-16"])
def test_fp8_cache_against_the_bf16_cache_is_inside_its_band(engine, chunk):
    ids = engine.encode(inspect.getsource(sched), chat=False)[:513]  # held-out text (docs/embedded-model.md)
    model = engine.model
    r = evaluate(
        _logits_through_cache(model, "fp8", chunk),
        ids,
        256,
        128,
        _logits_through_cache(model, "auto", chunk),
        progress=False,
    )
    assert r.n_scored == 512 and r.nonfinite == 0
    assert FP8_MIN_KLD <= r.kld_mean <= FP8_MAX_KLD, r.kld_mean
    assert r.top1_agreement >= FP8_MIN_TOP1, r.top1_agreement


def test_generation_with_the_fp8_cache_decodes(engine):
    engine.model.set_kv_cache_dtype("fp8")
    try:
        fp8 = engine.generate(["def add(a, b):"], max_new_tokens=8, temperature=0.0)
    finally:
        engine.model.set_kv_cache_dtype("auto")
    assert fp8 and fp8[0]
