"""Weight-format math (dsv3.quantize) and the reference linears' error bounds.

Bounds (derived in docs/quantization.md):

- fp8 e4m3 with block scale s: v = w / s has |v| <= 448. A normal e4m3 value (|v| >= 2^-6) has
  3 mantissa bits, so round-to-nearest errs by at most half a step, 2^-4 |v|; below 2^-6 the
  subnormal step is 2^-9, error <= 2^-10. Hence |w - dequant| <= max(2^-4 |w|, 2^-10 s).
- int8 per channel, s = amax / 127: |w - q s| <= s / 2.
- A final cast to bf16 adds at most 2^-8 |value| (8 significant bits: half a step is 2^-8).
Each check allows float32 rounding of the division and product (a few 2^-24 relative).
"""

from __future__ import annotations

import pytest
import torch

from dsv3 import quantize as qz
from dsv3.backends.cpu_ref import quant as ref
from dsv3.errors import Dsv3Error
from dsv3.model.config import QuantConfig, checkpoint_format
from dsv3.weights import FP8_BLOCK, HP, INT8_W8A8, INT8_WO, Weight

F32_SLACK = 2.0**-21  # relative, covers the float32 division and product


def _weights(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.02
    # a few outliers and an all-zero row make some blocks' scales very different from others
    w.view(-1)[::997] *= 40.0
    w[..., 3, :] = 0.0
    return w.to(torch.bfloat16).float()  # exactly representable in bf16: the "BF16 checkpoint" values


def _fp8_bound(w: torch.Tensor, q: Weight) -> torch.Tensor:
    s = qz.expand_blocks(q.scale, w.shape[-2], w.shape[-1], q.block_size)
    return torch.maximum(2.0**-4 * w.abs(), 2.0**-10 * s) + F32_SLACK * w.abs()


@pytest.mark.parametrize("shape", [(160, 136), (256, 128), (300, 129), (3, 144, 160)])
def test_fp8_round_trip_within_bound_with_partial_blocks(shape):
    w = _weights(shape)
    q = qz.quantize_weight_fp8(w)
    assert q.data.dtype == torch.float8_e4m3fn and q.data.shape == w.shape
    assert q.scale.shape == (*shape[:-2], -(-shape[-2] // 128), -(-shape[-1] // 128))
    back = qz.dequantize(q, torch.float32)
    err = (back - w).abs()
    assert bool((err <= _fp8_bound(w, q)).all()), f"max excess {(err - _fp8_bound(w, q)).max():.3g}"
    # the block amax lands on the largest e4m3 value, so every block uses the full range
    tiles = q.data.float().abs()
    assert tiles.max() == 448.0
    # -> BF16: one more rounding of at most 2^-8 relative
    back16 = qz.dequantize(q, torch.bfloat16).float()
    assert bool(((back16 - w).abs() <= _fp8_bound(w, q) + 2.0**-8 * back.abs()).all())


def test_fp8_edge_tile_scale_uses_only_its_own_values():
    w = torch.zeros(130, 260)
    w[129, 259] = 7.0  # the only value of the bottom-right 2 x 4 partial tile
    w[0, 0] = 1.0
    q = qz.quantize_weight_fp8(w)
    assert q.scale[1, 2].item() == pytest.approx(7.0 / 448.0)
    assert q.scale[0, 0].item() == pytest.approx(1.0 / 448.0)
    assert qz.dequantize(q, torch.float32)[129, 259].item() == 7.0


def test_ue8m0_scales_are_powers_of_two_and_bf16_round_trip_is_exact():
    w = _weights((200, 170), seed=1)
    q = qz.quantize_weight_fp8(w, scale_fmt="ue8m0")
    m, e = torch.frexp(q.scale)
    assert bool((m == 0.5).all()), "every ue8m0 scale is a power of two"
    assert bool((q.data.float().abs() <= 448).all())
    back = qz.dequantize(q, torch.float32)
    assert bool(((back - w).abs() <= _fp8_bound(w, q)).all())
    # e4m3 (4 significant bits) times a power of two is exact in bf16 (8 significant bits)
    assert torch.equal(qz.dequantize(q, torch.bfloat16).float(), back)
    # rounded up, never down: scale >= amax / 448
    plain = qz.quantize_weight_fp8(w)
    assert bool((q.scale >= plain.scale).all()) and bool((q.scale < 2 * plain.scale).all())


@pytest.mark.parametrize("shape", [(160, 136), (4, 136, 160)])
def test_int8_round_trip_within_half_a_step(shape):
    w = _weights(shape, seed=2)
    q = qz.quantize_weight_int8(w)
    assert q.data.dtype == torch.int8 and q.scale.shape == shape[:-1] and q.fmt == INT8_W8A8
    assert int(q.data.abs().max()) == 127 and int(q.data.min()) >= -127
    back = qz.dequantize(q, torch.float32)
    bound = q.scale.unsqueeze(-1) / 2 + F32_SLACK * w.abs()
    assert bool(((back - w).abs() <= bound).all())
    assert qz.quantize_weight_int8(w, INT8_WO).fmt == INT8_WO


def test_all_zero_block_stays_finite():
    w = torch.zeros(128, 256)
    for q in (qz.quantize_weight_fp8(w), qz.quantize_weight_int8(w)):
        back = qz.dequantize(q, torch.float32)
        assert bool(torch.isfinite(q.scale).all()) and torch.equal(back, w)


def test_cpu_ref_reexports_the_core_math():
    # kernels' tests import these names from cpu_ref; they must be the same objects, not copies
    for name in ("quantize_weight_fp8", "quantize_weight_int8", "dequantize", "round_scale_ue8m0", "FP8_MAX"):
        assert getattr(ref, name) is getattr(qz, name)


def test_quantize_weight_dispatch():
    w = _weights((130, 140))
    assert qz.quantize_weight(w, HP).data is w
    assert qz.quantize_weight(w, FP8_BLOCK, "ue8m0").scale_fmt == "ue8m0"
    assert qz.quantize_weight(w, INT8_WO).fmt == INT8_WO
    with pytest.raises(ValueError):
        qz.quantize_weight(w, "int4")


# ----------------------------------------------------------------- activation-quantized linears


def _x(m=5, k=160, seed=3):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g)
    x[1, 7] = 30.0  # an outlier channel: its block's scale is much larger than the others'
    return x


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_fp8_dynamic_linear_error_bound(scale_fmt):
    """|y_dyn - y_none| <= sum_k |x_k - x^_k| |w_k| with |x - x^| <= max(2^-4 |x|, 2^-10 s_x) per element."""
    x, w = _x(), _weights((136, 160))
    q = qz.quantize_weight_fp8(w, scale_fmt=scale_fmt)
    y_none = ref.linear_dequant(x, q)
    y_dyn = ref.linear_fp8_dynamic(x, q)
    _, s = ref.quantize_act_fp8(x, 128, torch.float8_e4m3fn, scale_fmt)
    s_full = s.repeat_interleave(128, dim=-1)[:, : x.shape[-1]]
    act_err = torch.maximum(2.0**-4 * x.abs(), 2.0**-10 * s_full)
    bound = act_err @ qz.dequantize(q, torch.float32).abs().T
    bound += 1e-5 * (x.abs() @ qz.dequantize(q, torch.float32).abs().T)  # float32 sums
    assert bool(((y_dyn - y_none).abs() <= bound).all())
    assert not torch.equal(y_dyn, y_none), "dynamic mode must actually quantize the activations"
    if scale_fmt == "ue8m0":
        assert bool((torch.frexp(s)[0] == 0.5).all())


def test_int8_dynamic_linear_error_bound():
    """Per token s_x = amax / 127: |y_dyn - y_none| <= s_x / 2 * sum_k |w_k| (integer products are exact)."""
    x, w = _x(), _weights((136, 160))
    q = qz.quantize_weight_int8(w)
    y_none = ref.linear_dequant(x.double(), Weight(q.data, q.fmt, q.scale.double()))
    y_dyn = ref.linear_int8_dynamic(x, q).double()
    _, s = ref.quantize_act_int8(x)
    bound = s.double().unsqueeze(-1) / 2 * qz.dequantize(q, torch.float64).abs().sum(-1) + 1e-5 * y_none.abs()
    assert bool(((y_dyn - y_none).abs() <= bound).all())
    assert not torch.allclose(y_dyn, y_none, rtol=0, atol=1e-9)


def test_weight_only_int8_never_quantizes_activations():
    x, w = _x(), _weights((136, 160))
    q = qz.quantize_weight_int8(w, INT8_WO)
    fn = ref.linear_for(INT8_WO, "dynamic")
    assert torch.equal(fn(x, q), ref.linear_dequant(x, q))


# ----------------------------------------------------------------- quantization_config


def test_checkpoint_format_from_quantization_config():
    assert checkpoint_format(None) == HP
    assert checkpoint_format(QuantConfig("fp8")) == FP8_BLOCK
    assert checkpoint_format(QuantConfig("int8")) == INT8_W8A8
    assert checkpoint_format(QuantConfig("int8", activation_scheme="weight_only")) == INT8_WO


@pytest.mark.parametrize(
    "q, field",
    [
        (QuantConfig("fp8", activation_scheme="static"), "activation_scheme"),
        (QuantConfig("int8", activation_scheme="static"), "activation_scheme"),
        (QuantConfig("awq"), "quant_method"),
    ],
)
def test_checkpoint_format_rejects_unknown_schemes(q, field):
    with pytest.raises(Dsv3Error, match=rf"ckpt/config.json: quantization_config\.{field} "):
        checkpoint_format(q, "ckpt/config.json")


def test_quantization_config_round_trips_through_checkpoint_format():
    from dsv3.model.config import config_from_dict

    for fmt in (FP8_BLOCK, INT8_W8A8, INT8_WO):
        raw = {"quantization_config": qz.quantization_config(fmt, "ue8m0" if fmt == FP8_BLOCK else None)}
        cfg = config_from_dict(raw)
        assert checkpoint_format(cfg.quantization) == fmt
    assert qz.quantization_config(HP) is None
    assert config_from_dict({"quantization_config": qz.quantization_config(FP8_BLOCK, "ue8m0")}).quantization.scale_fmt
