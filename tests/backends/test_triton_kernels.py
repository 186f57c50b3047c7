"""Every Triton kernel of the GPU backends against cpu_ref, on CPU through Triton's interpreter.

TRITON_INTERPRET=1 is set for this module only (the kernel modules must first be imported with
it set; see ``dsv3.backends.triton_kernels.jit_utils``). Shapes are small (the interpreter is
slow) but awkward: one token, N and K that are not multiples of 128 (partial fp8 blocks), stacked
experts, strided inputs, split-K and split-KV paths.

Tolerances (max |got - want| / max |want|), by what the format allows:
- activation quantization (fp8 e4m3fn / e4m3fnuz, with and without UE8M0 scales; int8) and
  weight dequantization: bit-exact. The kernels use correctly rounded division and round to the
  fp8 grid / to nearest even by hand, as torch's casts do.
- GEMMs, grouped MoE GEMMs, MLA attention, RMSNorm with float32 outputs: 1e-5. The products are
  exact (fp8 x fp8 and int8 x int8) or the same fp32 products; only the order of the fp32 sums
  differs (K <= 520 terms: a few 2^-24 relative).
- the same with bfloat16 outputs: 1e-2. Both sides round once to bfloat16 (2^-8 = 3.9e-3
  relative spacing); a sum landing next to a rounding boundary may round the other way.
"""

from __future__ import annotations

import sys

import pytest
import torch
import torch.nn.functional as F

from dsv3.backends.cpu_ref import attention as ref_attention
from dsv3.backends.cpu_ref import basic as ref_basic
from dsv3.backends.cpu_ref import quant as ref
from dsv3.backends.cpu_ref.moe import moe_experts_with
from dsv3.backends.triton_kernels import ops
from dsv3.backends.triton_kernels.runtime import INTERPRET_ENV, KernelArgumentError
from dsv3.backends.triton_kernels.target import AMD, NVIDIA
from dsv3.hookspecs import OpRequest
from dsv3.weights import FP8_BLOCK, HP, INT8_W8A8, INT8_WO, Weight
from tests.helpers import assert_within_max

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

FN, FNUZ = torch.float8_e4m3fn, torch.float8_e4m3fnuz
F32, BF16 = torch.float32, torch.bfloat16
TOL = {F32: 1e-5, BF16: 1e-2}


@pytest.fixture(scope="module", autouse=True)
def kernels():
    """The kernel modules, imported (or already imported) under TRITON_INTERPRET=1."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(INTERPRET_ENV, "1")
        gemm = sys.modules.get("dsv3.backends.triton_kernels.gemm")
        if gemm is not None and type(gemm._gemm_kernel).__name__ != "InterpretedFunction":
            pytest.skip("the Triton kernels were already compiled for a GPU in this process")
        yield ops._k()


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand(*shape, dtype=F32, seed=0, scale=1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen(seed)) * scale).to(dtype)


def assert_close(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    """max|got - want| <= rtol * max|want| (the TOL bounds above), through the kit's comparison."""
    assert_within_max(got, want, rtol, what, f"{rtol:g} of max|want| (module docstring)")


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype in (FN, FNUZ):
        return torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    return torch.equal(a, b)


def fp8_weight(out_f, in_f, fp8, seed=0, experts=0) -> Weight:
    shape = (experts, out_f, in_f) if experts else (out_f, in_f)
    return ref.quantize_weight_fp8(rand(*shape, seed=seed, scale=in_f**-0.5), 128, fp8)


def int8_weight(out_f, in_f, seed=0, experts=0, fmt=INT8_W8A8) -> Weight:
    shape = (experts, out_f, in_f) if experts else (out_f, in_f)
    return ref.quantize_weight_int8(rand(*shape, seed=seed, scale=in_f**-0.5), fmt)


# ----------------------------------------------------------------------------- quantization
def awkward_activations(m: int, k: int, dtype) -> torch.Tensor:
    """Magnitudes over 2^-12..2^12, a zero group (amax floor) and exact ties for the rounding."""
    x = rand(m, k, seed=m * 1000 + k) * torch.exp2(torch.randint(-12, 12, (m, k), generator=gen(1)).float())
    x[0, : min(k, 128)] = 0.0
    if m > 1:
        x[1, :4] = torch.tensor([448.0, -1.5, 2.5, 0.5])[: min(k, 4)]
    return x.to(dtype)


@pytest.mark.parametrize("fp8", [FN, FNUZ], ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("m,k,dtype", [(1, 7, F32), (5, 300, BF16), (3, 128, F32)], ids=str)
def test_act_quant_fp8_bit_exact(kernels, fp8, scale_fmt, m, k, dtype):
    x = awkward_activations(m, k, dtype)
    q, s = kernels.quant.act_quant_fp8(x, fp8, scale_fmt)
    q_ref, s_ref = ref.quantize_act_fp8(x, 128, fp8, scale_fmt)
    assert torch.equal(s, s_ref), f"scales differ: {(s - s_ref).abs().max().item():.3e}"
    assert bits_equal(q, q_ref), f"{(q.view(torch.uint8) != q_ref.view(torch.uint8)).sum().item()} fp8 codes differ"
    q1, s1 = kernels.quant.act_quant_fp8(x, fp8, scale_fmt, rows_per_program=1)  # the GPU's default tiling
    assert bits_equal(q1, q_ref) and torch.equal(s1, s_ref)


@pytest.mark.parametrize("m,k,dtype", [(1, 7, F32), (5, 300, BF16), (17, 2100, F32)], ids=str)
def test_act_quant_int8_bit_exact(kernels, m, k, dtype):
    x = awkward_activations(m, k, dtype)
    x[-1, :3] = torch.tensor([127.0, 63.5, -0.5]).to(dtype)  # ties at the row's own scale 1.0
    for rows in (None, 1):
        q, s = kernels.quant.act_quant_int8(x, rows_per_program=rows)
        q_ref, s_ref = ref.quantize_act_int8(x)
        assert torch.equal(s, s_ref)
        assert torch.equal(q, q_ref), f"{(q != q_ref).sum().item()} int8 codes differ"


@pytest.mark.parametrize("fmt", ["e4m3fn", "e4m3fnuz", "int8"])
@pytest.mark.parametrize("shape", [(130, 300), (3, 20, 129), (1, 16)], ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_dequantize_bit_exact(kernels, fmt, shape, dtype):
    experts = shape[0] if len(shape) == 3 else 0
    out_f, in_f = shape[-2:]
    w = (
        int8_weight(out_f, in_f, 2, experts)
        if fmt == "int8"
        else fp8_weight(out_f, in_f, FN if fmt == "e4m3fn" else FNUZ, 2, experts)
    )
    got = ops.dequantize(w, dtype)
    assert torch.equal(got, ref.dequantize(w, dtype))


# ----------------------------------------------------------------------------- GEMMs
GEMM_SHAPES = [(1, 16, 16), (3, 130, 300), (17, 256, 128), (5, 72, 520)]


@pytest.mark.parametrize("fp8", [FN, FNUZ], ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("m,n,k", GEMM_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_fp8_block_gemm_matches_linear_fp8_dynamic(kernels, fp8, m, n, k, dtype):
    x = rand(m, k, dtype=dtype, seed=m + n + k)
    w = fp8_weight(n, k, fp8, seed=n)
    w.scale_fmt = "ue8m0" if m == 3 else None
    qa, sa = kernels.quant.act_quant_fp8(x, fp8, w.scale_fmt)
    want = ref.linear_fp8_dynamic(x, w)
    assert_close(kernels.gemm.fp8_block_gemm(qa, sa, w.data, w.scale, dtype), want, TOL[dtype], "fp8_block_gemm")
    split = kernels.gemm.fp8_block_gemm(qa, sa, w.data, w.scale, dtype, split_k=3)
    assert_close(split, want, TOL[dtype], "fp8_block_gemm split_k=3")
    # the operator the backends hand out, with a 3-d input
    linear = ops.build_linear(OpRequest(FP8_BLOCK, "dynamic", dtype), NVIDIA)
    assert_close(linear(x.view(1, m, k), w), want.view(1, m, n), TOL[dtype], "linear[fp8_block/dynamic]")


@pytest.mark.parametrize("m,n,k", GEMM_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_int8_gemm_matches_linear_int8_dynamic(kernels, m, n, k, dtype):
    x = rand(m, k, dtype=dtype, seed=m * n)
    w = int8_weight(n, k, seed=k)
    qa, sa = kernels.quant.act_quant_int8(x)
    want = ref.linear_int8_dynamic(x, w)
    assert_close(kernels.gemm.int8_gemm(qa, sa, w.data, w.scale, dtype), want, TOL[dtype], "int8_gemm")
    assert_close(kernels.gemm.int8_gemm(qa, sa, w.data, w.scale, dtype, split_k=2), want, TOL[dtype], "split_k=2")
    linear = ops.build_linear(OpRequest(INT8_W8A8, "dynamic", dtype), NVIDIA)
    assert_close(linear(x, w), want, TOL[dtype], "linear[int8_w8a8/dynamic]")


@pytest.mark.parametrize("fmt", ["hp", "fp8 e4m3fn", "fp8 e4m3fnuz", INT8_W8A8, INT8_WO])
@pytest.mark.parametrize("m,n,k", [(1, 130, 300), (6, 16, 40)], ids=str)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_weight_only_gemm_matches_dequantized_linear(kernels, fmt, m, n, k, dtype):
    """act_quant "none": the weight dequantized to the compute dtype, the product in it."""
    x = rand(m, k, dtype=dtype, seed=7)
    if fmt == "hp":
        w = Weight(rand(n, k, dtype=dtype, seed=8, scale=k**-0.5))
    elif fmt.startswith("fp8"):
        w = fp8_weight(n, k, FN if fmt.endswith("fn") else FNUZ, seed=8)
    else:
        w = int8_weight(n, k, seed=8, fmt=fmt)
    want = F.linear(x, w.data) if fmt == "hp" else ref.linear_dequant(x, w)
    got = kernels.gemm.weight_gemm(x, w.data, w.scale, w.fmt)
    assert_close(got, want, TOL[dtype], f"weight_gemm[{fmt}]")
    assert_close(kernels.gemm.weight_gemm(x, w.data, w.scale, w.fmt, split_k=2), want, TOL[dtype], "split_k=2")
    linear = ops.build_linear(OpRequest(w.fmt, "none", dtype), AMD)
    assert_close(linear(x.view(m, 1, k), w), want.view(m, 1, n), TOL[dtype], f"linear[{w.fmt}/none]")


# ----------------------------------------------------------------------------- MoE
def expert_weights(fmt: str, e: int, inter: int, dim: int, dtype) -> list[Weight]:
    out = []
    for i, (o, n) in enumerate(((inter, dim), (inter, dim), (dim, inter))):
        if fmt == HP:
            out.append(Weight(rand(e, o, n, dtype=dtype, seed=20 + i, scale=n**-0.5)))
        elif fmt in ("fp8 e4m3fn", "fp8 e4m3fnuz"):
            out.append(fp8_weight(o, n, FN if fmt.endswith("fn") else FNUZ, seed=20 + i, experts=e))
        else:
            out.append(int8_weight(o, n, seed=20 + i, experts=e, fmt=fmt))
    return out


MOE_CASES = [
    # fmt, act_quant, (tokens, dim, inter, local experts, top-k, offset, global experts)
    (HP, "none", (1, 32, 16, 8, 3, 0, 8)),
    (HP, "none", (20, 64, 48, 4, 2, 0, 4)),
    ("fp8 e4m3fn", "none", (7, 200, 136, 6, 2, 2, 10)),
    ("fp8 e4m3fn", "dynamic", (7, 200, 136, 6, 2, 2, 10)),
    ("fp8 e4m3fnuz", "dynamic", (1, 32, 16, 8, 3, 0, 8)),
    (INT8_W8A8, "dynamic", (9, 40, 24, 5, 2, 0, 5)),
    (INT8_WO, "none", (9, 40, 24, 5, 2, 0, 5)),
]


@pytest.mark.parametrize("fmt,act_quant,dims", MOE_CASES, ids=lambda v: str(v).replace(" ", ""))
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_moe_experts_matches_cpu_ref(kernels, fmt, act_quant, dims, dtype):
    n_tok, dim, inter, e, k, offset, n_global = dims
    x = rand(n_tok, dim, dtype=dtype, seed=30)
    ids = torch.stack([torch.randperm(n_global, generator=gen(40 + i))[:k] for i in range(n_tok)])
    weights = torch.rand(n_tok, k, generator=gen(50))
    w1, w3, w2 = expert_weights(fmt, e, inter, dim, dtype)
    want = moe_experts_with(ref.linear_for(w1.fmt, act_quant))(x, weights, ids, w1, w3, w2, offset)
    impl = ops.build_moe_experts(OpRequest(w1.fmt, act_quant, dtype), AMD)
    got = impl(x, weights, ids, w1, w3, w2, offset)
    assert_close(got, want, TOL[dtype], f"moe_experts[{fmt}/{act_quant}]")
    if offset:  # tokens whose experts all live on another rank get exactly zero
        foreign = ((ids < offset) | (ids >= offset + e)).all(-1)
        assert torch.equal(got[foreign], torch.zeros_like(got[foreign]))


def test_align_by_expert_groups_every_assignment_once(kernels):
    ids = torch.tensor([[3, 0, 9], [0, 2, 3], [7, 3, 1], [0, 3, 2]])  # experts 9 and 7 are another rank's
    rows, block_expert = kernels.moe.align_by_expert(ids, expert_offset=0, n_local=5, block_m=2)
    flat = ids.reshape(-1)
    local = [i for i in range(flat.numel()) if flat[i] < 5]
    assert sorted(r for r in rows.tolist() if r >= 0) == local  # each local assignment once, others dropped
    for j, e in enumerate(block_expert.tolist()):
        block = [r for r in rows[2 * j : 2 * j + 2].tolist() if r >= 0]
        if e < 0:
            assert block == []
        else:
            assert all(flat[r] == e for r in block) and block  # one expert per block, no empty block
    assert block_expert.tolist() == sorted(block_expert.tolist(), key=lambda v: (v < 0, v))


# ----------------------------------------------------------------------------- norms, activation, attention
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_rms_norm_and_silu_and_mul(kernels, dtype):
    x, w = rand(2, 3, 40, dtype=dtype, seed=60, scale=3.0), rand(40, dtype=dtype, seed=61)
    assert_close(ops.rms_norm(x, w, 1e-6), ref_basic.rms_norm(x, w, 1e-6), TOL[dtype], "rms_norm")
    wide = rand(5, 52, dtype=dtype, seed=62)[:, :40]  # a strided view, as the split of the kv projection
    assert_close(ops.rms_norm(wide, w, 1e-6), ref_basic.rms_norm(wide, w, 1e-6), TOL[dtype], "rms_norm strided")
    one = rand(1, 7168, dtype=dtype, seed=63)
    w_big = rand(7168, dtype=dtype, seed=64)
    assert_close(ops.rms_norm(one, w_big, 1e-6), ref_basic.rms_norm(one, w_big, 1e-6), TOL[dtype], "rms_norm 7168")
    g, u = rand(3, 1100, dtype=dtype, seed=65, scale=4.0), rand(3, 1100, dtype=dtype, seed=66)
    assert_close(ops.silu_and_mul(g, u), ref_basic.silu_and_mul(g, u), TOL[dtype], "silu_and_mul")


@pytest.mark.parametrize(
    "b,t,h,c,r,s,splits",
    [(1, 1, 4, 16, 4, 5, None), (2, 1, 16, 512, 64, 40, 3), (2, 3, 5, 24, 8, 9, None), (1, 2, 20, 16, 4, 70, 2)],
    ids=str,
)
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_mla_latent_attention_matches_cpu_ref(kernels, b, t, h, c, r, s, splits, dtype):
    q_latent, q_pe = rand(b, t, h, c, dtype=dtype, seed=70), rand(b, t, h, r, dtype=dtype, seed=71)
    kv = rand(b, s + 3, c, dtype=dtype, seed=72)[:, :s]  # a view into a longer cache, as the model passes
    pe = rand(b, s, r, dtype=dtype, seed=73)
    q_pos = torch.randint(0, s, (b, t), generator=gen(74))
    q_pos[0, -1] = s - 1
    want = ref_attention.mla_latent_attention(q_latent, q_pe, kv, pe, q_pos, 0.3)
    got = kernels.mla.mla_latent_attention(q_latent, q_pe, kv, pe, q_pos, 0.3, num_splits=splits)
    assert_close(got, want, TOL[dtype], f"mla_latent_attention splits={splits}")


# ----------------------------------------------------------------------------- checks, formats, plugins
def test_wrappers_reject_bad_arguments_with_one_clear_line(kernels):
    x = rand(4, 256)
    w = fp8_weight(128, 256, FN)
    q, s = kernels.quant.act_quant_fp8(x)
    cases = [
        (lambda: kernels.quant.act_quant_fp8(x.to(torch.int32)), "act_quant_fp8: x must have dtype in"),
        (lambda: kernels.quant.act_quant_fp8(x, torch.float16), "fp8_dtype must be float8_e4m3fn or float8_e4m3fnuz"),
        (
            lambda: kernels.gemm.fp8_block_gemm(q, s[:, :1], w.data, w.scale),
            "a_scale must have shape [4, 2], got [4, 1]",
        ),
        (lambda: kernels.gemm.fp8_block_gemm(q, s, w.data.view(FNUZ), w.scale), "b must have dtype in (float8_e4m3fn)"),
        (lambda: kernels.gemm.int8_gemm(q, s, w.data, w.scale), "int8_gemm: a must have dtype in (int8)"),
        (lambda: kernels.gemm.weight_gemm(x, w.data[:, :100], w.scale, FP8_BLOCK), "x is (M, K) = [4, 256]"),
        (lambda: kernels.norm.rms_norm(x, torch.ones(7), 1e-6), "rms_norm: weight must have shape [256]"),
        (
            lambda: kernels.norm.rms_norm(x.to("meta"), torch.ones(256, device="meta"), 1e-6),
            "tensors must be on the cpu",
        ),
        (lambda: kernels.dequant.dequantize_weight(w.data, w.scale, "nf4", F32), "unknown quantized format 'nf4'"),
    ]
    for call, message in cases:
        with pytest.raises(KernelArgumentError) as info:
            call()
        assert message in str(info.value) and "\n" not in str(info.value)


def test_e4m3fnuz_conversion_keeps_values_and_cpu_ref_follows_the_weight_dtype(kernels):
    from dsv3.backends.amd.plugin import prepare_weight

    w = fp8_weight(130, 300, FN, seed=80)
    w.data.view(torch.uint8)[0, :3] = 0x80  # negative zeros: NaN if reinterpreted as fnuz
    fnuz = prepare_weight(w)
    assert fnuz.data.dtype == FNUZ and not torch.isnan(fnuz.data.float()).any()
    assert torch.equal(fnuz.scale, w.scale * 2)
    assert torch.equal(ref.dequantize(fnuz, F32), ref.dequantize(w, F32))  # the same values exactly
    assert prepare_weight(fnuz) is None and prepare_weight(int8_weight(8, 8)) is None  # nothing else changes
    # cpu_ref quantizes activations with the weight's own fp8 range (240 for fnuz)
    x = rand(3, 300, seed=81)
    qa, sa = ref.quantize_act_fp8(x, 128, FNUZ)
    want = F.linear(qa.float() * sa.repeat_interleave(128, -1)[:, :300], ref.dequantize(fnuz, F32))
    assert_close(ref.linear_fp8_dynamic(x, fnuz), want, 1e-6, "cpu_ref linear_fp8_dynamic on fnuz")
    linear = ops.build_linear(OpRequest(FP8_BLOCK, "dynamic", F32), AMD)
    assert_close(linear(x, fnuz), want, TOL[F32], "kernel linear on fnuz")


def test_operator_table_and_reasons(kernels, monkeypatch):
    for op in ("rms_norm", "silu_and_mul", "attention", "mla_latent_attention", "dequantize"):
        assert getattr(ops, f"build_{op}")(OpRequest(), AMD) is not None
    for op in ("embedding", "rotary", "moe_gate", "sample"):
        assert not hasattr(ops, f"build_{op}")  # left to cpu_ref (torch ops run on any device)
    assert ops.build_linear(OpRequest(HP), AMD) is ops.linear_hp
    assert ops.build_linear(OpRequest("nf4"), AMD) is None
    for kind in ("fp8", "int8"):
        assert ops.fast_path_status(kind) == (False, "vendor GEMM fast paths are used on NVIDIA GPUs only")
    assert ops.vendor_min_m("fp8") == ops.FAST_MIN_M
    monkeypatch.setenv("DSV3_INT8_GEMM", "vendor")
    assert ops.vendor_min_m("int8") == 1
    monkeypatch.setenv("DSV3_FP8_GEMM", "triton")
    assert ops.fast_path_status("fp8") == (False, "DSV3_FP8_GEMM=triton") and ops.vendor_min_m("fp8") is None
    monkeypatch.setattr(ops.importlib.util, "find_spec", lambda name: None)
    assert ops.triton_unusable_reason() == "triton is not installed (pip install triton)"
    assert ops.unusable_reason(NVIDIA) == ops.unusable_reason(AMD) == "triton is not installed (pip install triton)"


# ----------------------------------------------------------------------------- non-finite values (dsv3.weights)
def nonfinite_acts(m: int, k: int, dtype) -> torch.Tensor:
    """NaN, +inf and -inf in rows 0-2 (the last one in the partial group), finite rows after them."""
    x = awkward_activations(m, k, F32)
    x[0, 3], x[1, min(130, k - 1)], x[2, k - 1] = float("nan"), float("inf"), float("-inf")
    return x.to(dtype)


def same_with_nans(got: torch.Tensor, want: torch.Tensor) -> bool:
    """NaN exactly where want has NaN (fp8: any NaN code), the same bits everywhere else."""
    g, w = (got.float(), want.float())
    nan = w.isnan()
    if not torch.equal(g.isnan(), nan):
        return False
    if got.dtype in (FN, FNUZ):
        return torch.equal(got.view(torch.uint8)[~nan], want.view(torch.uint8)[~nan])
    return torch.equal(got[~nan], want[~nan])


@pytest.mark.parametrize("fp8", [FN, FNUZ], ids=["e4m3fn", "e4m3fnuz"])
@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
def test_act_quant_fp8_nonfinite_as_cpu_ref(kernels, fp8, scale_fmt, dtype):
    """A group with a NaN or an inf: NaN scale, NaN codes (the old kernel stored -448 and a finite scale)."""
    x = nonfinite_acts(5, 300, dtype)
    q_ref, s_ref = ref.quantize_act_fp8(x, 128, fp8, scale_fmt)
    assert s_ref[:3].isnan().any(-1).all() and torch.isfinite(s_ref[3:]).all()
    for rows in (None, 1):
        q, s = kernels.quant.act_quant_fp8(x, fp8, scale_fmt, rows_per_program=rows)
        assert same_with_nans(s, s_ref), f"scales: {s.tolist()} vs {s_ref.tolist()}"
        assert same_with_nans(q, q_ref)
        nan_bytes = q.view(torch.uint8)[q.float().isnan()]
        assert nan_bytes.numel() == 3 * 128 - 84 and (nan_bytes == (0x7F if fp8 == FN else 0x80)).all()


def test_act_quant_int8_nonfinite_as_cpu_ref(kernels):
    x = nonfinite_acts(5, 300, F32)
    q_ref, s_ref = ref.quantize_act_int8(x)
    for rows in (None, 1):
        q, s = kernels.quant.act_quant_int8(x, rows_per_program=rows)
        assert same_with_nans(s, s_ref) and s[:3].isnan().all()
        assert torch.equal(q, q_ref) and (q[:3] == 0).all()  # the old kernel stored +-127 for NaN


def test_round_helpers_keep_nan_and_inf(kernels):
    """round_up_pow2 (UE8M0) and the bf16 rounding: inf and NaN in, inf and NaN out, whatever the NaN's bits."""
    import triton
    import triton.language as tl

    from dsv3.backends.triton_kernels import jit_utils

    global _jit_utils  # the interpreter resolves names in this module's globals, not in closures
    _jit_utils = jit_utils

    @triton.jit
    def probe(x_ptr, pow2_ptr, bf16_ptr, N: tl.constexpr):
        offs = tl.arange(0, N)
        x = tl.load(x_ptr + offs)
        tl.store(pow2_ptr + offs, _jit_utils.round_up_pow2(x))
        tl.store(bf16_ptr + offs, _jit_utils.round_to(x, tl.bfloat16))

    bits = torch.tensor(
        [0x7F800000, 0x7FC00000, 0x7FFFFFFF, 0xFFFFFFFF - 2**32, 0x40400000, 0x3E800001], dtype=torch.int32
    )
    x = bits.view(torch.float32)  # inf, NaN, NaN as CUDA makes it, -NaN with a full mantissa, 3.0, 0.25(1 + 2^-23)
    xs = torch.cat([x, torch.ones(2)])  # a power-of-two length for tl.arange
    pow2, bf16 = torch.empty(8), torch.empty(8, dtype=BF16)
    probe[(1,)](xs, pow2, bf16, N=8)
    assert pow2[0] == float("inf") and pow2[1:4].isnan().all()  # the old helper gave -0.0 for NaN
    assert pow2[4:6].tolist() == [4.0, 0.5]
    assert bf16[0] == float("inf") and bf16[1:4].isnan().all()  # the old rounding gave -0.0 for 0x7FFFFFFF
    assert torch.equal(bf16[4:6], x[4:6].to(BF16))


def test_e4m3fn_nan_becomes_the_fnuz_nan(kernels):
    from dsv3.backends.amd.plugin import prepare_weight

    w = fp8_weight(130, 300, FN, seed=82)
    w.data.view(torch.uint8)[0, :2] = torch.tensor([0x7F, 0xFF], dtype=torch.uint8)  # fn's NaNs; +-240 in fnuz
    fnuz = prepare_weight(w)
    assert (fnuz.data.view(torch.uint8)[0, :2] == 0x80).all()
    deq = ref.dequantize(fnuz, F32)
    assert deq[0, :2].isnan().all() and torch.equal(deq[1:], ref.dequantize(w, F32)[1:])
