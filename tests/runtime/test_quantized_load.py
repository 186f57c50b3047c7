"""Quantized checkpoints end to end: FP8 (released block format) and INT8 load resident, run, and fail clearly.

Tolerances:
- FP8 with --act-quant none against its dequantized conversion, same compute dtype: both paths
  multiply the same dequantized values (fp8 x fp32 scale, rounded once to the compute dtype) with
  the same ops, so the logits agree to float32 rounding; we allow 1e-5 x max|logit| in float32 and
  1e-2 x max|logit| in bfloat16 (observed: identical).
- --act-quant dynamic against none: each e4m3 activation rounding errs by <= 2^-4 relative
  (RMS ~2.5% for a spread of mantissas); errors add roughly in quadrature through the residual
  stream, so the logits' relative RMS difference is held to 0.10 (observed ~0.045).
  INT8 per-token activations (step amax/127) are finer: 0.05 (observed ~0.013).
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3 import cli
from dsv3.backends.cpu_ref import quant as ref
from dsv3.errors import Dsv3Error
from dsv3.model.graph import Linear
from dsv3.weights import FP8_BLOCK, HP, INT8_W8A8, INT8_WO, Weight
from tests.helpers import QUANT_SHAPES, make_checkpoint, quantize_checkpoint

TOKENS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(0))
PROMPTS = [[0, 5, 9, 3, 77, 12], [0, 40, 8, 2]]
QUANTIZED_PER_LAYER = {"dense": 5 + 3, "moe": 5 + 3 + 3}  # attention 5; MLP 3 or shared 3 + stacked experts 3


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    src = make_checkpoint(root / "src", seed=1, mtp=True, **QUANT_SHAPES)
    out = {"src": src}
    out["fp8"] = quantize_checkpoint(src, root / "fp8", "fp8")
    out["fp8_fp32"] = quantize_checkpoint(out["fp8"], root / "fp8_fp32", "fp32")
    out["fp8_bf16"] = quantize_checkpoint(out["fp8"], root / "fp8_bf16", "bf16")
    out["ue8m0"] = quantize_checkpoint(src, root / "ue8m0", "fp8", scale_fmt="ue8m0")
    out["int8"] = quantize_checkpoint(src, root / "int8", "int8")
    out["int8_wo"] = quantize_checkpoint(src, root / "int8_wo", "int8-wo")
    return out


def _load(path, dtype="float32", act_quant="none", attn_impl="absorb"):
    return dsv3.load(path, dtype=dtype, act_quant=act_quant, attn_impl=attn_impl, progress=False)


def _linears(engine):
    return [(n, m) for n, m in engine.model.named_modules() if isinstance(m, Linear)]


def _greedy(engine) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(PROMPTS, max_new_tokens=5, temperature=0.0)]


def _rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_fp8_checkpoint_stays_resident_in_fp8(ckpts):
    engine = _load(ckpts["fp8"], dtype="bfloat16")
    cfg = engine.cfg
    quantized = [(n, m) for n, m in _linears(engine) if m.fmt != HP]
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers))
    n_dense = cfg.num_hidden_layers + cfg.num_nextn_predict_layers - n_moe
    assert len(quantized) == n_dense * QUANTIZED_PER_LAYER["dense"] + n_moe * QUANTIZED_PER_LAYER["moe"]
    for name, lin in quantized:
        assert lin.fmt == FP8_BLOCK, name
        assert lin.weight.dtype == torch.float8_e4m3fn, name
        assert lin.scale.dtype == torch.float32, name
        assert lin.scale.shape[-2:] == (-(-lin.weight.shape[-2] // 128), -(-lin.weight.shape[-1] // 128))
    hp = {n for n, m in _linears(engine) if m.fmt == HP}
    assert hp == {"head", "mtp.0.eh_proj", "mtp.0.head"}, "only lm_head, eh_proj and the MTP head stay high precision"
    assert engine.model.layers[1].ffn.gate_weight.dtype == torch.float32  # the router gate
    assert any(n.startswith("mtp.0.block.") for n, _ in quantized), "the MTP layer's projections are quantized"

    params = sum(m.weight.numel() for _, m in quantized)
    nbytes = sum(m.weight.nbytes + m.scale.nbytes for _, m in quantized)
    assert nbytes / params <= 1.01, f"{nbytes / params:.5f} bytes per parameter"

    bf16 = _load(ckpts["fp8_bf16"], dtype="bfloat16")
    same = [dict(_linears(bf16))[n] for n, _ in quantized]
    assert sum(m.weight.nbytes for m in same) / sum(m.weight.numel() for m in same) == 2.0


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_fp8_none_matches_dequantized_conversion_float32(ckpts, attn_impl):
    fp8 = _load(ckpts["fp8"], "float32", attn_impl=attn_impl)
    deq = _load(ckpts["fp8_fp32"], "float32", attn_impl=attn_impl)
    a, b = fp8.logits(TOKENS), deq.logits(TOKENS)
    assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()
    assert _greedy(fp8) == _greedy(deq)


def test_fp8_none_matches_dequantized_conversion_bfloat16(ckpts):
    fp8, deq = _load(ckpts["fp8"], "bfloat16"), _load(ckpts["fp8_bf16"], "bfloat16")
    a, b = fp8.logits(TOKENS), deq.logits(TOKENS)
    assert (a - b).abs().max().item() <= 1e-2 * b.abs().max().item()
    assert _greedy(fp8) == _greedy(deq)


def test_fp8_dynamic_within_tolerance_of_dequantized(ckpts):
    none = _load(ckpts["fp8"]).logits(TOKENS)
    dyn = _load(ckpts["fp8"], act_quant="dynamic").logits(TOKENS)
    err = _rel_rms(dyn, none)
    assert 0 < err <= 0.10, err


def test_ue8m0_scale_format_is_honoured(ckpts):
    cfg = json.loads((ckpts["ue8m0"] / "config.json").read_text())
    assert cfg["quantization_config"]["scale_fmt"] == "ue8m0"
    engine = _load(ckpts["ue8m0"], act_quant="dynamic")
    lin = engine.model.layers[0].attn.wq_a
    assert lin.scale_fmt == "ue8m0"
    assert bool((torch.frexp(lin.scale)[0] == 0.5).all()), "weight scales are powers of two"
    x = torch.randn(4, lin.weight.shape[1], generator=torch.Generator().manual_seed(5))
    w = lin.as_weight()
    expect = ref.linear_fp8_dynamic(x, w)
    plain = ref.linear_fp8_dynamic(x, Weight(w.data, w.fmt, w.scale, w.block_size, None))
    assert torch.equal(lin(x), expect)
    assert not torch.equal(expect, plain), "ue8m0 activation scales change the result"
    err = _rel_rms(engine.logits(TOKENS), _load(ckpts["ue8m0"]).logits(TOKENS))
    assert 0 < err <= 0.10, err


def test_int8_w8a8_and_weight_only(ckpts):
    w8a8 = _load(ckpts["int8"])
    fmts = {m.fmt for _, m in _linears(w8a8)}
    assert fmts == {HP, INT8_W8A8}
    for _, m in _linears(w8a8):
        if m.fmt != HP:
            assert m.weight.dtype == torch.int8 and m.scale.shape == m.weight.shape[:-1]
    none = w8a8.logits(TOKENS)
    dyn = _load(ckpts["int8"], act_quant="dynamic").logits(TOKENS)
    err = _rel_rms(dyn, none)
    assert 0 < err <= 0.05, err

    wo = _load(ckpts["int8_wo"], act_quant="dynamic")
    assert {m.fmt for _, m in _linears(wo)} == {HP, INT8_WO}
    assert torch.equal(wo.logits(TOKENS), none), "weight-only int8 ignores --act-quant dynamic"


# ----------------------------------------------------------------- bad input


def _broken_copy(src, dst, edit_tensors=None, edit_config=None):
    shutil.copytree(src, dst)
    if edit_tensors is not None:
        file = dst / "model.safetensors"
        tensors = load_file(str(file))
        edit_tensors(tensors)
        save_file(tensors, str(file), metadata={"format": "pt"})
    if edit_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        edit_config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


QA = "model.layers.0.self_attn.q_a_proj"
EXPERT = "model.layers.1.mlp.experts.5.gate_proj"


@pytest.mark.parametrize(
    "which, edit_tensors, edit_config, message",
    [
        ("fp8", lambda t: t.pop(f"{QA}.weight_scale_inv"), None, rf"missing scale tensor .*weight {QA}\.weight"),
        (
            "fp8",
            lambda t: t.pop(f"{EXPERT}.weight_scale_inv"),
            None,
            rf"missing scale tensor {EXPERT}\.weight_scale_inv",
        ),
        (
            "fp8",
            lambda t: t.__setitem__(f"{QA}.weight_scale_inv", torch.ones(1, 1)),
            None,
            rf"tensor {QA}\.weight_scale_inv has shape \[1, 1\], expected \[2, 2\]",
        ),
        ("int8", lambda t: t.pop(f"{QA}.weight_scale"), None, rf"missing scale tensor .*I8 weight {QA}\.weight"),
        (
            "int8",
            lambda t: t.__setitem__(f"{QA}.weight_scale", torch.ones(3)),
            None,
            rf"tensor {QA}\.weight_scale has shape \[3\], expected \[144\]",
        ),
        (
            "fp8",
            None,
            lambda c: c["quantization_config"].update(quant_method="awq"),
            r"quantization_config\.quant_method",
        ),
        ("fp8", None, lambda c: c["quantization_config"].update(fmt="e5m2"), r"quantization_config\.fmt 'e5m2'"),
        (
            "fp8",
            None,
            lambda c: c["quantization_config"].update(activation_scheme="static"),
            r"quantization_config\.activation_scheme 'static'",
        ),
        ("fp8", None, lambda c: c.pop("quantization_config"), r"weight_scale_inv found but .* no quantization_config"),
    ],
)
def test_bad_quantized_checkpoints_fail_clearly(ckpts, tmp_path, capsys, which, edit_tensors, edit_config, message):
    bad = _broken_copy(ckpts[which], tmp_path / "bad", edit_tensors, edit_config)
    with pytest.raises(Dsv3Error, match=message):
        _load(bad)
    assert cli.main(["run", "--ckpt-path", str(bad), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("dsv3: error: ") and "\n" not in err
