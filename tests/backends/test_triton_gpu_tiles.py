"""The Triton GEMM under the interpreter with the tiles a GPU would pick (``DSV3_TRITON_TILES=sm_90`` / ``gfx942``):
thin decode tiles, split-K and ragged edges, against a float64 reference; and the interpreter's own large tiles
kept under Triton's block-element limit at the 671B and 16B projection shapes."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton", reason="the GPU backends' kernels are Triton (the 'triton' extra)")

import sys  # noqa: E402

from dsv3.backends.triton_kernels import ops, runtime  # noqa: E402

A_HP, A_FP8, B_HP, B_FP8, B_INT8 = 0, 1, 0, 1, 2  # gemm's operand kinds (gemm.A_* / gemm.B_*)

# (N, K) of DeepSeek-V3 671B's projections (q_a, q_b, kv_a, o, dense MLP up/down, expert up/down) and V2-Lite 16B's
SHAPES = [(1536, 7168), (24576, 1536), (576, 7168), (7168, 16384), (18432, 7168), (7168, 18432), (2048, 7168)]
SHAPES += [(7168, 2048), (3072, 2048), (2048, 10944), (10944, 2048), (2048, 1408)]


@pytest.fixture(scope="module")
def gemm():
    """The kernel modules, imported (or already imported) under TRITON_INTERPRET=1 (see jit_utils)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(runtime.INTERPRET_ENV, "1")
        loaded = sys.modules.get("dsv3.backends.triton_kernels.gemm")
        if loaded is not None and type(loaded._gemm_kernel).__name__ != "InterpretedFunction":
            pytest.skip("the Triton kernels were already compiled for a GPU in this process")
        kernels = ops._k().gemm
        assert (kernels.A_HP, kernels.A_FP8, kernels.B_HP, kernels.B_FP8, kernels.B_INT8) == (0, 1, 0, 1, 2)
        yield kernels


@pytest.fixture
def interpret(gemm, monkeypatch):
    monkeypatch.setenv(runtime.INTERPRET_ENV, "1")
    monkeypatch.delenv(runtime.TILES_ENV, raising=False)
    return monkeypatch


def pick_config(*args, **kw):
    return sys.modules["dsv3.backends.triton_kernels.gemm"].pick_config(*args, **kw)


@pytest.mark.parametrize("kinds", [(A_HP, B_HP), (A_FP8, B_FP8), (A_HP, B_INT8)])
@pytest.mark.parametrize("m", [1, 64, 4096])
def test_interpreter_tiles_stay_under_the_block_limit(interpret, m, kinds):
    """The interpreter's own tiles (as large as the problem) once exceeded 2^20 elements at these shapes."""
    for n, k in SHAPES:
        c = pick_config(m, n, k, *kinds)
        for a, b in ((c.block_m, c.block_k), (c.block_k, c.block_n), (c.block_m, c.block_n)):
            assert a * b <= runtime.MAX_BLOCK_NUMEL, (m, n, k, c)
        assert c.split_k == 1


def test_emulated_gpu_choices(interpret):
    interpret.setenv(runtime.TILES_ENV, "sm_90")
    decode = pick_config(1, 7168, 2048, A_HP, B_HP)  # 112 tiles on 132 SMs: split-K fills the GPU
    assert (decode.block_m, decode.block_n, decode.block_k) == (16, 64, 64) and decode.split_k == 2
    assert (
        pick_config(4096, 7168, 2048, A_HP, B_HP).block_m == 128
        and pick_config(4096, 7168, 2048, A_HP, B_HP).split_k == 1
    )
    interpret.setenv(runtime.TILES_ENV, "gfx942")
    assert pick_config(4096, 7168, 2048, A_HP, B_HP).block_m == 64  # MI300's LDS caps the A tile
    interpret.setenv(runtime.TILES_ENV, "sm_80x")
    with pytest.raises(ValueError, match="DSV3_TRITON_TILES='sm_80x'"):
        pick_config(1, 64, 64, A_HP, B_HP)


def _fp8_operands(m: int, n: int, k: int, fp8: torch.dtype, g: torch.Generator):
    from dsv3.quantize import quantize_weight_fp8

    a = torch.randn(m, k, generator=g)
    b = torch.randn(n, k, generator=g) * 0.05
    groups = a.view(m, -1, 128)
    a_scale = groups.abs().amax(-1).clamp(min=1e-4) / torch.finfo(fp8).max  # (M, K/128)
    a_q = (groups / a_scale.unsqueeze(-1)).to(fp8).view(m, k)
    w = quantize_weight_fp8(b, fp8_dtype=fp8)
    return a_q, a_scale, w.data, w.scale


@pytest.mark.parametrize("gpu", ["sm_90", "gfx942"])
@pytest.mark.parametrize(
    "m, n, k",
    [
        (1, 1024, 2048),  # thin decode tile, split-K on 132 SMs / 304 CUs (16 tiles)
        (37, 200, 1000),  # ragged M, N and K (masks on every edge), split-K
        (129, 130, 96),  # one row past a 128 / 64 tile; K under two tiles
    ],
)
def test_gpu_tiles_match_a_float64_reference(gemm, interpret, gpu, m, n, k):
    """float32 GEMM (ieee products) with the GPU's tiles and split-K: within K float32 roundings of the
    float64 result (each of the K products and partial sums rounds once: |err| <= K * 2^-24 * sum|a||b|)."""
    interpret.setenv(runtime.TILES_ENV, gpu)
    g = torch.Generator().manual_seed(m * 7 + n)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    config = pick_config(m, n, k, A_HP, B_HP, a_dtype=torch.float32)
    got = gemm.weight_gemm(x, w, None, "hp")
    want = x.double() @ w.double().T
    bound = k * 2**-24 * (x.double().abs() @ w.double().abs().T)
    assert ((got.double() - want).abs() <= bound).all(), config
    if m == 1:
        assert config.split_k > 1 and config.block_m == 16  # the thin tile and the split-K reduction ran


@pytest.mark.parametrize("gpu", ["sm_90", "gfx942"])
def test_gpu_tiles_fp8_block_gemm_decode(gemm, interpret, gpu):
    """FP8 block GEMM at a thin decode shape with split-K equals the dequantized product to float32 accumulation."""
    interpret.setenv(runtime.TILES_ENV, gpu)
    m, n, k = 1, 512, 2048
    g = torch.Generator().manual_seed(3)
    fp8 = torch.float8_e4m3fnuz if gpu == "gfx942" else torch.float8_e4m3fn  # MI300's fp8 is e4m3fnuz
    a_q, a_scale, b_q, b_scale = _fp8_operands(m, n, k, fp8, g)
    config = pick_config(m, n, k, A_FP8, B_FP8)
    assert config.split_k > 1
    got = gemm.fp8_block_gemm(a_q, a_scale, b_q, b_scale, out_dtype=torch.float32)
    a = (a_q.double().view(m, -1, 128) * a_scale.double().unsqueeze(-1)).view(m, k)
    b = (b_q.double().view(n // 128, 128, k // 128, 128) * b_scale.double()[:, None, :, None]).view(n, k)
    want = a @ b.T
    bound = k * 2**-24 * (a.abs() @ b.abs().T)  # the fp8 values are exact; only the float32 sums round
    assert ((got.double() - want).abs() <= bound + 1e-30).all()
