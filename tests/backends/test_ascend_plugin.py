"""The ascend plugin without a model: usability, what it declines, each operator against cpu_ref,
and the load-time FP8 conversion.

The operators run through the torch_npu TEST STAND-IN (tests/ascend_standin) on machines without
an NPU, through torch_npu where it is installed. Tolerances: float32 1e-5 relative (float32 sums
in another order); bfloat16 2e-2 relative to the output's scale (a few bf16 ulps: fused operators
round once where cpu_ref rounds after each PyTorch op).
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import pytest
import torch

from dsv3.backends.ascend import convert, plugin
from dsv3.backends.ascend.fallback import AscendFallbackWarning
from dsv3.backends.cpu_ref import attention as ref_attention
from dsv3.backends.cpu_ref import basic, quant
from dsv3.backends.cpu_ref import moe as ref_moe
from dsv3.conformance.tolerances import EXACT
from dsv3.errors import Dsv3Error
from dsv3.hookspecs import OpRequest
from dsv3.model.config import Routing
from dsv3.registry import OP_NAMES, make_backend
from dsv3.runtime.loading import conversion_target
from dsv3.weights import FP8_BLOCK, HP, INT8_W8A8, INT8_WO, Weight
from tests.ascend_standin import standin
from tests.helpers import absolute, assert_close

BF16, FP32 = torch.bfloat16, torch.float32
TOL = {FP32: 1e-5, BF16: 2e-2}
WHY = {  # the module docstring's reasons
    FP32: "float32 sums in another order",
    BF16: "a few bf16 ulps: fused operators round once where cpu_ref rounds after each PyTorch op",
}
V3_ROUTING = Routing(
    top_k=3, n_experts=8, scoring="sigmoid", n_group=2, topk_group=1, norm_topk_prob=True, scale=2.5, has_bias=True
)


@pytest.fixture
def npu(monkeypatch):
    return standin.activate(monkeypatch)


def op(name: str, fmt: str = HP, act_quant: str = "none", dtype: torch.dtype = BF16):
    return getattr(plugin, f"dsv3_op_{name}")(OpRequest(fmt, act_quant, dtype))


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """|got - want| <= tol * max(max|want|, 1) (tol by dtype), through the kit's comparison (tests.helpers)."""
    scale = float(want.float().abs().max().clamp(min=1.0))
    tol = absolute(f"{TOL[dtype]:g} x max(max|want|, 1)", TOL[dtype] * scale, WHY[dtype])
    assert_close(got, want, tol)


def calls(npu, name: str) -> int:
    return npu.CALLS[name] if standin.is_standin(npu) else -1


def ran(npu, name: str, before: int) -> None:
    if standin.is_standin(npu):  # the real torch_npu keeps no count
        assert npu.CALLS[name] > before, f"{name} was not called"


def g(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def dev(npu) -> str:
    return plugin.dsv3_backend_info().device


# ------------------------------------------------------------------ usability
def test_unusable_without_torch_npu(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # makes `import torch_npu` fail here
    info = make_backend(plugin, "ascend").info
    assert info.unusable_reason.startswith("torch_npu is not installed (import torch_npu failed: ")
    assert info.dist_backend == "hccl" and info.device == "npu"


def test_unusable_when_no_npu_is_visible(npu, monkeypatch):
    monkeypatch.setattr(npu.npu, "is_available", lambda: False)
    assert make_backend(plugin, "ascend").unusable_reason == "torch_npu imported but no NPU is visible"


def test_usable_with_torch_npu(npu):
    info = make_backend(plugin, "ascend").info
    assert info.unusable_reason is None
    assert info.dist_backend == "hccl"
    assert info.device == ("cpu" if standin.is_standin(npu) else "npu")
    assert info.formats == (HP, INT8_W8A8)
    assert info.convert_formats == {FP8_BLOCK: (HP, INT8_W8A8)} and info.convert_weight is convert.convert_weight


def test_importing_the_plugin_imports_no_torch_npu():
    code = "import sys, dsv3.backends.ascend.plugin; assert 'torch_npu' not in sys.modules, 'imported'"
    env = {**os.environ, "PYTHONPATH": str(standin.PYTHONPATH_DIR)}  # an importable torch_npu is there
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


def test_declines(npu):
    assert op("linear", FP8_BLOCK, "dynamic") is None  # no FP8 on 910B: converted at load instead
    assert op("linear", FP8_BLOCK) is None
    assert op("linear", INT8_WO) is None
    assert op("linear", INT8_W8A8, "none") is None  # W8A8 means dynamic activation quantization
    assert op("linear", INT8_W8A8, "dynamic", FP32) is None  # quantized matmuls output fp16/bf16
    assert op("moe_experts", FP8_BLOCK, "dynamic") is None
    assert op("attention", dtype=FP32) is None and op("mla_latent_attention", dtype=FP32) is None
    for name in ("embedding", "dequantize", "sample"):
        assert not hasattr(plugin, f"dsv3_op_{name}")
    assert op("linear", INT8_W8A8, "dynamic") is not None and op("moe_experts", INT8_W8A8, "dynamic") is not None
    implemented = [n for n in OP_NAMES if hasattr(plugin, f"dsv3_op_{n}")]
    assert all(op(n) is not None for n in implemented if n not in ("linear", "moe_experts"))


# ------------------------------------------------------------------ operators against cpu_ref
@pytest.mark.parametrize("dtype", [FP32, BF16])
def test_rms_norm_rotary_swiglu(npu, dtype):
    d = dev(npu)
    x = torch.randn(2, 3, 32, generator=g(1)).to(d, dtype)
    w = (1 + 0.1 * torch.randn(32, generator=g(2))).to(d, dtype)
    before = calls(npu, "npu_rms_norm")
    close(op("rms_norm", dtype=dtype)(x, w, 1e-6), basic.rms_norm(x, w, 1e-6), dtype)
    ran(npu, "npu_rms_norm", before)

    xr = torch.randn(2, 3, 4, 8, generator=g(3)).to(d, dtype)  # (B, T, H, R)
    ang = torch.rand(2, 3, 4, generator=g(4)) * 6  # per-row positions: cos/sin differ along B and T
    cos, sin = ang.cos().to(d), ang.sin().to(d)
    before = calls(npu, "npu_rotary_mul")
    close(op("rotary", dtype=dtype)(xr, cos, sin), basic.rotary(xr, cos, sin), dtype)
    ran(npu, "npu_rotary_mul", before)

    gate, up = (torch.randn(5, 16, generator=g(s)).to(d, dtype) for s in (5, 6))
    before = calls(npu, "npu_swiglu")
    close(op("silu_and_mul", dtype=dtype)(gate, up), basic.silu_and_mul(gate, up), dtype)
    ran(npu, "npu_swiglu", before)


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
def test_attention_forms(npu, dtype):
    d = dev(npu)
    pos = torch.tensor([[2, 3, 4], [0, 1, 2]], device=d)  # row 1 is shorter: its cache tail is stale
    q, k = (torch.randn(2, n, 4, 12, generator=g(s)).to(d, dtype) for n, s in ((3, 1), (5, 2)))
    v = torch.randn(2, 5, 4, 8, generator=g(3)).to(d, dtype)  # Dqk 12, Dv 8: both padded to 16
    before = calls(npu, "npu_fused_infer_attention_score")
    close(op("attention", dtype=dtype)(q, k, v, pos, 0.3), ref_attention.attention(q, k, v, pos, 0.3), BF16)
    ql, qp = torch.randn(2, 3, 4, 16, generator=g(4)).to(d, dtype), torch.randn(2, 3, 4, 4, generator=g(5)).to(d, dtype)
    kv, pe = torch.randn(2, 5, 16, generator=g(6)).to(d, dtype), torch.randn(2, 5, 4, generator=g(7)).to(d, dtype)
    want = ref_attention.mla_latent_attention(ql, qp, kv, pe, pos, 0.3)
    close(op("mla_latent_attention", dtype=dtype)(ql, qp, kv, pe, pos, 0.3), want, BF16)
    # decode: one query per row
    got = op("mla_latent_attention", dtype=dtype)(ql[:, -1:], qp[:, -1:], kv, pe, pos[:, -1:], 0.3)
    close(got, ref_attention.mla_latent_attention(ql[:, -1:], qp[:, -1:], kv, pe, pos[:, -1:], 0.3), BF16)
    ran(npu, "npu_fused_infer_attention_score", before)


def test_attention_beyond_the_fused_limits_falls_back_and_says_so(npu):
    d = dev(npu)
    pos = torch.tensor([[0, 1]], device=d)
    ql, qp = torch.randn(1, 2, 2, 512, generator=g(1)).to(d, BF16), torch.randn(1, 2, 2, 64, generator=g(2)).to(d, BF16)
    kv, pe = torch.randn(1, 2, 512, generator=g(3)).to(d, BF16), torch.randn(1, 2, 64, generator=g(4)).to(d, BF16)
    before = calls(npu, "npu_fused_infer_attention_score")
    with pytest.warns(AscendFallbackWarning, match="head dim 576"):
        got = op("mla_latent_attention")(ql, qp, kv, pe, pos, 0.1)  # the 671B absorbed shape: D = 512 + 64
    assert_close(got, ref_attention.mla_latent_attention(ql, qp, kv, pe, pos, 0.1), EXACT, "cpu_ref fallback")
    assert calls(npu, "npu_fused_infer_attention_score") == before


@pytest.mark.parametrize("dtype", [torch.float16, BF16])
def test_w8a8_linear(npu, dtype):
    d = dev(npu)
    w = quant.quantize_weight_int8(torch.randn(24, 40, generator=g(1))).to(d)
    x = torch.randn(2, 3, 40, generator=g(2)).to(d, dtype)
    before = calls(npu, "npu_quant_matmul")
    close(op("linear", INT8_W8A8, "dynamic", dtype)(x, w), quant.linear_int8_dynamic(x, w), dtype=BF16)
    ran(npu, "npu_quant_matmul", before)
    close(op("linear", dtype=dtype)(x, Weight(w.data.to(dtype))), x @ w.data.to(dtype).t(), BF16)


@pytest.mark.parametrize(
    "routing, bias",
    [
        (V3_ROUTING, True),  # V3: sigmoid, bias, groups ranked by top-2 sums, renormalized
        (Routing(6, 8, "softmax", 1, 1, False, 16.0, False), False),  # V2 greedy: softmax, no renorm
        (Routing(2, 12, "softmax", 4, 2, False, 1.0, False), False),  # groups ranked by their max
    ],
)
def test_moe_gate(npu, routing, bias):
    d = dev(npu)
    e = routing.n_experts
    x = torch.randn(9, 32, generator=g(1)).to(d, BF16)
    w = torch.randn(e, 32, generator=g(2)).to(d)
    b = (0.3 * torch.randn(e, generator=g(3))).to(d) if bias else None
    before = calls(npu, "npu_moe_gating_top_k")
    with warnings.catch_warnings():
        warnings.simplefilter("error", AscendFallbackWarning)
        weights, ids = op("moe_gate")(x, w, b, routing)
    ran(npu, "npu_moe_gating_top_k", before)
    want_w, want_ids = ref_moe.moe_gate(x, w, b, routing)
    assert ids.dtype == torch.int64
    assert_close(ids, want_ids, EXACT, "expert ids")
    close(weights, want_w, FP32)


@pytest.mark.parametrize(
    "routing, why",
    [
        (Routing(3, 8, "sigmoid", 2, 1, False, 2.5, True), "without renormalization"),
        (Routing(3, 8, "softmax", 1, 1, True, 1.0, False), "renormalized softmax"),
        (Routing(2, 8, "sigmoid", 4, 2, True, 1.0, True), "8 experts in 4 groups"),  # 2 per group: needs > 2
    ],
)
def test_moe_gate_outside_the_operator_falls_back_and_says_so(npu, routing, why):
    d = dev(npu)
    x, w = torch.randn(5, 16, generator=g(1)).to(d), torch.randn(8, 16, generator=g(2)).to(d)
    b = torch.randn(8, generator=g(3)).to(d) if routing.has_bias else None
    before = calls(npu, "npu_moe_gating_top_k")
    with pytest.warns(AscendFallbackWarning, match=why):
        weights, ids = op("moe_gate")(x, w, b, routing)
    want_w, want_ids = ref_moe.moe_gate(x, w, b, routing)
    assert_close(ids, want_ids, EXACT, "expert ids (cpu_ref fallback)")
    assert_close(weights, want_w, EXACT, "routing weights (cpu_ref fallback)")
    assert calls(npu, "npu_moe_gating_top_k") == before


@pytest.mark.parametrize("fmt, dtype", [(HP, FP32), (HP, BF16), (INT8_W8A8, BF16)])
@pytest.mark.parametrize("offset", [0, 4])  # 4: this rank holds experts 4..7, the others' ids add nothing
def test_moe_experts(npu, fmt, dtype, offset):
    d = dev(npu)
    n_local = 8 - offset
    x = torch.randn(6, 32, generator=g(1)).to(d, dtype)
    ids = torch.stack([torch.randperm(8, generator=g(10 + i))[:3] for i in range(6)]).to(d)  # (N, k)
    weights = torch.rand(6, 3, generator=g(2)).to(d)
    mats = [
        0.2 * torch.randn(n_local, *shape, generator=g(3 + i)) for i, shape in enumerate([(16, 32)] * 2 + [(32, 16)])
    ]
    if fmt == HP:
        w1, w3, w2 = (Weight(m.to(d, dtype)) for m in mats)
    else:
        w1, w3, w2 = (quant.quantize_weight_int8(m).to(d) for m in mats)
    act_quant = "dynamic" if fmt == INT8_W8A8 else "none"
    before = calls(npu, "npu_grouped_matmul")
    got = op("moe_experts", fmt, act_quant, dtype)(x, weights, ids, w1, w3, w2, offset)
    ran(npu, "npu_grouped_matmul", before)
    want = ref_moe.moe_experts_with(quant.linear_for(fmt, act_quant))(x, weights, ids, w1, w3, w2, offset)
    close(got, want, dtype)


def test_moe_experts_with_no_local_tokens(npu):
    d = dev(npu)
    x = torch.randn(3, 32, generator=g(1)).to(d, BF16)
    ids = torch.tensor([[0, 1], [1, 2], [2, 0]], device=d)
    w1, w3, w2 = (
        Weight(torch.randn(2, 16, 32).to(d, BF16)),
        Weight(torch.randn(2, 16, 32).to(d, BF16)),
        Weight(torch.randn(2, 32, 16).to(d, BF16)),
    )
    out = op("moe_experts")(x, torch.ones(3, 2, device=d), ids, w1, w3, w2, 4)  # this rank: experts 4, 5
    assert torch.equal(out, torch.zeros_like(x))


# ------------------------------------------------------------------ load-time conversion
def test_convert_fp8_to_hp_is_the_exact_dequantization():
    w = quant.quantize_weight_fp8(torch.randn(200, 136, generator=g(1)))  # partial 128-blocks on both axes
    got = convert.convert_weight(w, HP)
    assert got.fmt == HP and got.data.dtype == FP32 and got.scale is None
    assert_close(got.data, quant.dequantize(w, FP32), EXACT, "converted weight")


def test_convert_fp8_to_int8_w8a8_per_output_channel():
    w = quant.quantize_weight_fp8(torch.randn(200, 136, generator=g(1)))
    full = quant.dequantize(w, FP32)
    got = convert.convert_weight(w, INT8_W8A8)
    assert got.fmt == INT8_W8A8 and got.data.dtype == torch.int8 and got.scale.shape == (200,)
    assert torch.allclose(got.scale, full.abs().amax(dim=-1) / 127)
    err = (quant.dequantize(got, FP32) - full).abs()
    # round to nearest: half a step at most (fp8 values often sit exactly on a half step: ties, plus float32 rounding)
    assert (err <= got.scale.unsqueeze(-1) / 2 * (1 + 1e-5)).all()


def test_convert_refuses_what_it_does_not_convert():
    w = quant.quantize_weight_fp8(torch.randn(8, 8, generator=g(1)))
    with pytest.raises(ValueError, match="not fp8_block to int8_wo"):
        convert.convert_weight(w, INT8_WO)
    with pytest.raises(ValueError, match="not hp to hp"):
        convert.convert_weight(Weight(torch.randn(8, 8)), HP)


def test_conversion_target(npu):
    info = plugin.dsv3_backend_info()
    assert conversion_target(info, FP8_BLOCK, None, "ckpt") == HP  # the backend's default
    assert conversion_target(info, FP8_BLOCK, INT8_W8A8, "ckpt") == INT8_W8A8
    assert conversion_target(info, HP, None, "ckpt") == HP
    assert conversion_target(info, INT8_W8A8, None, "ckpt") == INT8_W8A8  # not converted: held as stored
    with pytest.raises(Dsv3Error, match="backend ascend runs the fp8_block weights of ckpt as hp or int8_w8a8"):
        conversion_target(info, FP8_BLOCK, FP8_BLOCK, "ckpt")
    with pytest.raises(Dsv3Error, match="ckpt has no quantized weights to convert"):
        conversion_target(info, HP, INT8_W8A8, "ckpt")
