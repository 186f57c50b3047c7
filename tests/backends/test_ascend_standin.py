"""The ascend backend end to end on tiny checkpoints, against cpu_ref.

Without an NPU the plugin runs its real code path against the torch_npu TEST STAND-IN
(tests/ascend_standin: the used operators' documented semantics in plain PyTorch, "NPU" tensors
on the CPU); with torch_npu installed the same tests run on the NPU.

Tolerances (logits are O(1) here): float32 compute 1e-4 absolute (the stand-in reorders float32
sums only: 5e-7 measured); bfloat16 compute 0.05 absolute, a few bf16 ulps at |logit| ~ 2 (fused
SwiGLU/attention round once where cpu_ref rounds per PyTorch op: 0.016 measured); W8A8 against
cpu_ref on the same int8 weights 0.06, about 8 bf16 ulps (the grouped matmul takes its weight
scale in bf16, 2^-8 relative: 0.031 measured), and against the FP8 weights dequantized 0.15 (int8
requantization of the weights plus per-token activation quantization: 0.04 measured). In bf16
and W8A8 greedy tokens are checked to be within that tolerance of cpu_ref's best, not equal: the
tiny random model has bf16 near-ties (seen: cpu_ref bf16 and float32 pick different first tokens
while their logits differ by at most 0.027).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.backends.cpu_ref.quant import quantize_weight_fp8
from dsv3.errors import Dsv3Error
from dsv3.runtime.checkpoint import iter_linear_modules
from dsv3.runtime.engine import Engine
from dsv3.runtime.loading import build_model
from tests.ascend_standin import standin
from tests.helpers import absolute, assert_close

PROMPTS = [[0, 5, 9, 13, 2], [0, 7, 3]]
NEW_TOKENS = 8
#: The released FP8 checkpoint quantizes these projections (router, norms, embeddings, heads stay high precision).
FP8_PROJECTIONS = re.compile(
    r"\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj|gate_proj|up_proj|down_proj)\.weight$"
)
# the sizes and reasons are the module docstring's
FP32_TOL = absolute("float32 logits", 1e-4, "the stand-in reorders float32 sums only (5e-7 measured)")
BF16_TOL = absolute("bfloat16 logits", 0.05, "a few bf16 ulps at |logit| ~ 2 (fused ops round once: 0.016 measured)")
W8A8_TOL = absolute("W8A8 logits", 0.06, "about 8 bf16 ulps: the weight scale is taken in bf16 (0.031 measured)")
W8A8_VS_FP8_TOL = absolute(
    "W8A8 vs fp8 logits", 0.15, "int8 requantization of the weights and of the activations (0.04 measured)"
)
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and idle OpenMP threads slow a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def npu(monkeypatch):
    """torch_npu for this test: the stand-in, or the real one where installed."""
    return standin.activate(monkeypatch)


def _rewrite(src: Path, dst: Path, transform, quantization_config: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    save_file(transform(tensors), str(dst / "model.safetensors"), metadata={"format": "pt"})
    if quantization_config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        cfg["quantization_config"] = quantization_config
        (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _to_fp8(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for name, t in tensors.items():
        if FP8_PROJECTIONS.search(name):
            w = quantize_weight_fp8(t)  # float8_e4m3fn data + (ceil(out/128), ceil(in/128)) fp32 scales
            out[name] = w.data
            out[name[: -len("weight")] + "weight_scale_inv"] = w.scale
        else:
            out[name] = t
    return out


@pytest.fixture(scope="module")
def ckpts(tiny_ckpt, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint in BF16, and in the released FP8 layout (made with cpu_ref's quantize_weight_fp8)."""
    root = tmp_path_factory.mktemp("ascend")
    bf16 = _rewrite(tiny_ckpt, root / "bf16", lambda ts: {k: v.to(torch.bfloat16) for k, v in ts.items()})
    fp8 = _rewrite(tiny_ckpt, root / "fp8", _to_fp8, FP8_CONFIG)
    return {"bf16": bf16, "fp8": fp8}


def _tokens(engine: Engine) -> list[list[int]]:
    return [c.token_ids for c in engine.generate(PROMPTS, max_new_tokens=NEW_TOKENS)]


def _logits(engine: Engine) -> torch.Tensor:
    return engine.logits(PROMPTS[:1]).float().cpu()


def _ran(npu, *ops: str) -> None:
    if standin.is_standin(npu):  # the real torch_npu keeps no count
        missing = [op for op in ops if npu.CALLS[op] == 0]
        assert not missing, f"torch_npu operators never called: {missing}"


def _assert_greedy_within(engine: Engine, ref: Engine, tol: float) -> None:
    """Each greedy token of ``engine`` is, for ``ref`` fed the same sequence, within ``tol`` of ref's best.

    Exact token equality in float32; in bf16 the tiny random model has near-ties (top two logits
    closer than the bf16 error), so equality there is luck and the check is this one.
    """
    if engine.model.opts.dtype == torch.float32:
        assert _tokens(engine) == _tokens(ref)
        return
    for prompt, tokens in zip(PROMPTS, _tokens(engine), strict=True):
        seq_logits = ref.logits([prompt + tokens])[0].float()  # (T, V), no cache
        for i, tok in enumerate(tokens):
            row = seq_logits[len(prompt) - 1 + i]
            assert row[tok] >= row.max() - tol, f"step {i}: token {tok} is {row.max() - row[tok]:.3g} below the best"


def _snapshot(path: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*")}


# ------------------------------------------------------------------ BF16 checkpoint
@pytest.mark.parametrize(
    "dtype, attn_impl, tol",
    [("float32", "absorb", FP32_TOL), ("bfloat16", "absorb", BF16_TOL), ("bfloat16", "naive", BF16_TOL)],
)
def test_bf16_checkpoint_matches_cpu_ref(npu, ckpts, dtype, attn_impl, tol):
    ref = dsv3.load(ckpts["bf16"], "cpu_ref", dtype=dtype, attn_impl=attn_impl)
    asc = dsv3.load(ckpts["bf16"], "ascend", dtype=dtype, attn_impl=attn_impl)
    _assert_greedy_within(asc, ref, tol.atol)
    assert_close(_logits(asc), _logits(ref), tol, "logits")
    # what ran where: the fused operators, and only the stated fallbacks
    _ran(npu, "npu_rms_norm", "npu_rotary_mul", "npu_moe_gating_top_k", "npu_grouped_matmul", "npu_swiglu")
    fallbacks = set(asc.model.ops.fallbacks)
    assert fallbacks >= {"embedding", "sample"}
    if attn_impl == "absorb":  # the paged latent cache's ops are declined, and reported (docs/ascend.md)
        assert {"paged_cache_write", "mla_paged_attention"} <= fallbacks
    if dtype == "bfloat16":
        _ran(npu, "npu_fused_infer_attention_score")
        assert not fallbacks & {"attention", "mla_latent_attention", "linear[hp]", "moe_experts[hp]"}
    else:  # the fused attention takes fp16/bf16 queries only
        assert {"attention", "mla_latent_attention"} <= fallbacks


# ------------------------------------------------------------------ FP8 checkpoint, converted at load
@pytest.mark.parametrize("dtype, tol", [("float32", FP32_TOL), ("bfloat16", BF16_TOL)])
def test_fp8_checkpoint_converted_to_bf16_matches_cpu_ref_on_dequantized_weights(npu, ckpts, dtype, tol, tmp_path):
    before = _snapshot(ckpts["fp8"])
    parent_before = sorted(p.name for p in ckpts["fp8"].parent.iterdir())
    asc = dsv3.load(ckpts["fp8"], "ascend", dtype=dtype)
    # every quantized linear now holds the dequantized weight in the compute dtype, nothing in fp8
    linears = dict(iter_linear_modules(asc.model))
    assert {lin.fmt for lin in linears.values()} == {"hp"}
    assert all(lin.weight.dtype == getattr(torch, dtype) and lin.scale is None for lin in linears.values())
    # cpu_ref runs the FP8 weights as stored, dequantizing them in the compute dtype
    ref = dsv3.load(ckpts["fp8"], "cpu_ref", dtype=dtype)
    assert ref.model.layers[0].attn.wq_a.fmt == "fp8_block"
    _assert_greedy_within(asc, ref, tol.atol)
    assert_close(_logits(asc), _logits(ref), tol, "logits")
    # converted in memory: the checkpoint is untouched and no converted copy was written next to it
    assert _snapshot(ckpts["fp8"]) == before
    assert sorted(p.name for p in ckpts["fp8"].parent.iterdir()) == parent_before


def _cpu_ref_twin(engine: Engine, act_quant: str) -> Engine:
    """A cpu_ref model holding exactly the tensors ``engine`` holds (after its load-time conversion)."""
    fmts = {name: lin.fmt for name, lin in iter_linear_modules(engine.model)}
    model = build_model(
        engine.cfg,
        "cpu_ref",
        engine.model.opts.dtype,
        "absorb",
        act_quant,
        tuple(sorted(set(fmts.values()))),
        fmt_of=lambda path: fmts.get(path, "hp"),
        device="cpu",
    )
    state = {k: v.cpu() for k, v in engine.model.state_dict().items()}
    model.load_state_dict(state, strict=True)
    return Engine(model.eval())


def test_fp8_checkpoint_converted_to_int8_w8a8(npu, ckpts):
    asc = dsv3.load(ckpts["fp8"], "ascend", dtype="bfloat16", act_quant="dynamic", weight_format="int8_w8a8")
    linears = dict(iter_linear_modules(asc.model))
    quantized = {n for n, lin in linears.items() if lin.fmt == "int8_w8a8"}
    assert quantized and all(linears[n].weight.dtype == torch.int8 for n in quantized)
    assert linears["layers.1.ffn.w1"].scale.shape == (8, 16)  # per expert, per output channel
    assert {linears[n].fmt for n in ("head", "mtp.0.head", "mtp.0.eh_proj")} == {"hp"}  # stored in high precision
    assert "linear[int8_w8a8]" not in asc.model.ops.fallbacks
    assert "moe_experts[int8_w8a8]" not in asc.model.ops.fallbacks
    twin = _cpu_ref_twin(asc, "dynamic")  # cpu_ref's exact W8A8 on the same int8 weights
    assert_close(_logits(asc), _logits(twin), W8A8_TOL, "W8A8 vs cpu_ref on the same int8 weights: logits")
    _assert_greedy_within(asc, twin, W8A8_TOL.atol)
    _ran(npu, "npu_dynamic_quant", "npu_quant_matmul", "npu_grouped_matmul")
    fp8_ref = dsv3.load(ckpts["fp8"], "cpu_ref", dtype="bfloat16")
    assert_close(_logits(asc), _logits(fp8_ref), W8A8_VS_FP8_TOL, "W8A8 vs the FP8 weights dequantized: logits")


def test_weight_format_requests(npu, ckpts):
    with pytest.raises(Dsv3Error, match=r"backend ascend runs the fp8_block weights of .* as hp or int8_w8a8"):
        dsv3.load(ckpts["fp8"], "ascend", weight_format="fp8_block")
    with pytest.raises(Dsv3Error, match=r"backend cpu_ref runs the fp8_block weights of .* as fp8_block \(as stored\)"):
        dsv3.load(ckpts["fp8"], "cpu_ref", weight_format="int8_w8a8")
    with pytest.raises(Dsv3Error, match=r"has no quantized weights to convert"):
        dsv3.load(ckpts["bf16"], "ascend", weight_format="int8_w8a8")


def test_converted_weight_missing_scale_is_named(npu, ckpts, tmp_path):
    gone = "model.layers.1.mlp.experts.3.up_proj.weight_scale_inv"
    bad = _rewrite(ckpts["fp8"], tmp_path / "bad", lambda ts: {k: v for k, v in ts.items() if k != gone})
    with pytest.raises(Dsv3Error, match=f"missing scale tensor {re.escape(gone)}"):
        dsv3.load(bad, "ascend")


# ------------------------------------------------------------------ the command line
def _dsv3(*args: str, standin_on_path: bool, npus: int = 1) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(standin.PYTHONPATH_DIR)] if standin_on_path else [])
    env["DSV3_STANDIN_NPU_COUNT"] = str(npus)
    return subprocess.run(
        [sys.executable, "-m", "dsv3", *args], capture_output=True, text=True, env=env, timeout=300, check=False
    )


@pytest.mark.skipif(standin.real_torch_npu_installed(), reason="torch_npu is installed on this machine")
def test_cli_without_torch_npu_says_why(ckpts):
    reason = "torch_npu is not installed (import torch_npu failed: No module named 'torch_npu')"
    listing = _dsv3("backends", "--brief", standin_on_path=False)
    assert listing.returncode == 0, listing.stderr
    assert f"ascend: NOT usable: {reason}" in listing.stdout.splitlines()
    run = _dsv3(
        "run", "--backend", "ascend", "--ckpt-path", str(ckpts["bf16"]), "--prompt", "hi", standin_on_path=False
    )
    assert run.returncode == 2
    assert (
        run.stderr.strip().splitlines()[-1] == f"dsv3: error: backend 'ascend' is not usable on this machine: {reason}"
    )


@pytest.mark.skipif(standin.real_torch_npu_installed(), reason="the stand-in cannot shadow an installed torch_npu")
def test_cli_with_torch_npu_but_no_npu_says_why(ckpts):
    reason = "torch_npu imported but no NPU is visible"
    listing = _dsv3("backends", "--brief", standin_on_path=True, npus=0)
    assert f"ascend: NOT usable: {reason}" in listing.stdout.splitlines()
    run = _dsv3(
        "run", "--backend", "ascend", "--ckpt-path", str(ckpts["bf16"]), "--prompt", "hi", standin_on_path=True, npus=0
    )
    assert run.returncode == 2
    assert (
        run.stderr.strip().splitlines()[-1] == f"dsv3: error: backend 'ascend' is not usable on this machine: {reason}"
    )


@pytest.mark.skipif(standin.real_torch_npu_installed(), reason="the stand-in cannot shadow an installed torch_npu")
def test_cli_usable_lists_operators_and_takes_weight_format(ckpts):
    listing = _dsv3("backends", standin_on_path=True)
    assert listing.returncode == 0, listing.stderr
    text = listing.stdout
    assert "ascend: usable" in text and "communication hccl" in text
    assert re.search(r"^\s+linear\s+hp/none hp/dynamic int8_w8a8/dynamic$", text, re.M), text
    args = ("run", "--backend", "ascend", "--ckpt-path", str(ckpts["fp8"]), "--prompt", "hi", "--weight-format")
    run = _dsv3(*args, "fp8_block", standin_on_path=True)
    assert run.returncode == 2
    assert "weight format 'fp8_block' is not available: backend ascend runs the fp8_block weights" in run.stderr
