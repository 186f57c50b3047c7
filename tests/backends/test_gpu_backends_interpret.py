"""The nvidia and amd backends end to end on CPU through Triton's interpreter (TRITON_INTERPRET=1).

Their real Triton kernels (RMSNorm, SiLU-and-multiply, MLA decode, GEMMs, grouped MoE,
quantization) run on CPU tensors; the rest falls back to cpu_ref and is reported. The interpreter
is slow (tens of milliseconds a kernel launch), so the models are tiny (2 layers, one of them MoE)
and generations short; cpu_ref's results are computed once per checkpoint and mode.

Tolerances:
- fp32/bf16 weights and FP8 weights with --act-quant none: the same greedy tokens as cpu_ref. The
  kernels reproduce cpu_ref's roundings (dequantized weights in the compute dtype, fp32 sums); only
  the order of fp32 additions differs (~1e-7 relative), far below the gaps between top logits.
- --act-quant dynamic: activations are quantized bit-identically to cpu_ref and the fp8 products
  are exact, so logits agree to fp32 summation order: |diff| <= 1e-3 x max|logit| (fp32 compute).
  amd computes in e4m3fnuz (max 240), so its reference is cpu_ref on the same converted weights;
  against cpu_ref on the e4m3fn weights it is only close (a different fp8 grid for activations):
  relative RMS difference <= 0.1, the bound test_quantized_load uses for fp8 activation noise.
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
from dsv3.cli import main as dsv3_main
from dsv3.runtime.checkpoint import apply_scale_fmt_and_prepare
from tests.helpers import add_tiny_tokenizer, assert_within_max, make_checkpoint

pytest.importorskip("triton", reason="the GPU backends need triton (pip install triton)")

PROMPTS = [[0, 5, 9, 3, 77, 12], [0, 40, 8]]
NEW_TOKENS = 4
SMALL = dict(num_hidden_layers=2, first_k_dense_replace=1)  # one dense layer, one MoE layer
# the fp8 model: weights as small as the released ones (at TINY's 0.1 the random model is chaotic,
# and fp8 activation noise would flip its expert choices); every tiny dim is a partial 128-block
CALM = dict(initializer_range=0.02)
# projection linears the released FP8 checkpoints store in fp8 (norms, embeddings, lm_head, router stay hp)
FP8_LINEAR = re.compile(
    r"\.(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
    r"|mlp\.(shared_experts\.|experts\.\d+\.)?(gate_proj|up_proj|down_proj))\.weight$"
)
FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def write_fp8_checkpoint(src: Path, dst: Path) -> Path:
    """Copy a checkpoint, storing every projection linear as e4m3fn + weight_scale_inv (released layout)."""
    dst.mkdir(parents=True)
    out = {}
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        if FP8_LINEAR.search(name):
            w = quantize_weight_fp8(tensor.float())
            out[name] = w.data
            out[name[: -len("weight")] + "weight_scale_inv"] = w.scale
        else:
            out[name] = tensor
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = FP8_CONFIG
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in src.iterdir():
        if f.name not in ("model.safetensors", "config.json"):
            shutil.copy(f, dst / f.name)
    return dst


@pytest.fixture(scope="module", autouse=True)
def interpreter():
    """TRITON_INTERPRET=1 for this module only (other modules see the GPU backends as unusable)."""
    from dsv3.backends.triton_kernels import runtime

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(runtime.INTERPRET_ENV, "1")
        gemm = sys.modules.get("dsv3.backends.triton_kernels.gemm")
        if gemm is not None and type(gemm._gemm_kernel).__name__ != "InterpretedFunction":
            pytest.skip("the Triton kernels were already compiled for a GPU in this process")
        yield


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu_interp")
    hp = make_checkpoint(root / "hp", seed=3, **SMALL)
    add_tiny_tokenizer(hp)
    src = make_checkpoint(root / "quant_src", seed=1, **SMALL, **CALM)
    return {"hp": hp, "fp8": write_fp8_checkpoint(src, root / "fp8")}


def _run(ckpt, backend, dtype="float32", act_quant="none", generate=True):
    """(engine, greedy tokens for PROMPTS or None, full-sequence logits of the first prompt)."""
    eng = dsv3.load(ckpt, backend=backend, dtype=dtype, act_quant=act_quant, progress=False)
    tokens = None
    if generate:
        tokens = [c.token_ids for c in eng.generate(PROMPTS, max_new_tokens=NEW_TOKENS, temperature=0.0)]
    return eng, tokens, eng.logits([PROMPTS[0]])


_REFERENCE: dict = {}


def _reference(ckpts, kind, dtype="float32", act_quant="none", generate=True):
    """cpu_ref's (tokens, logits) for a checkpoint and mode, computed once for the module."""
    key = (kind, dtype, act_quant, generate)
    if key not in _REFERENCE:
        _REFERENCE[key] = _run(ckpts[kind], "cpu_ref", dtype, act_quant, generate)[1:]
    return _REFERENCE[key]


@pytest.mark.parametrize(
    "backend,dtype", [("nvidia", "float32"), ("nvidia", "bfloat16"), ("amd", "bfloat16")], ids=lambda v: v
)
def test_hp_weights_same_greedy_tokens_as_cpu_ref(ckpts, backend, dtype):
    want, want_logits = _reference(ckpts, "hp", dtype)
    eng, got, logits = _run(ckpts["hp"], backend, dtype)
    table = eng.model.ops
    # the backend's own kernels ran (not a silent fallback)
    assert table.sources["rms_norm"] == backend and table.sources["mla_latent_attention"] == backend
    assert table.sources["moe_experts[hp]"] == backend
    assert got == want
    assert len(got[0]) == NEW_TOKENS
    tol = 1e-4 if dtype == "float32" else 5e-2  # bf16: one rounding of 2^-8 can move a logit that much
    assert_within_max(logits, want_logits, tol, "logits")


@pytest.mark.parametrize("backend", ["nvidia", "amd"])
def test_fp8_weights_act_quant_none_same_greedy_tokens(ckpts, backend):
    want, want_logits = _reference(ckpts, "fp8")
    eng, got, logits = _run(ckpts["fp8"], backend)
    assert eng.model.ops.sources["linear[fp8_block]"] == backend
    assert eng.model.ops.sources["moe_experts[fp8_block]"] == backend
    fp8_dtype = eng.model.layers[0].attn.wq_a.weight.dtype
    assert fp8_dtype == (torch.float8_e4m3fnuz if backend == "amd" else torch.float8_e4m3fn)
    assert got == want
    assert_within_max(logits, want_logits, 1e-4, "logits")


@pytest.mark.parametrize("backend", ["nvidia", "amd"])
def test_fp8_weights_act_quant_dynamic_close_logits(ckpts, backend):
    eng, _, logits = _run(ckpts["fp8"], backend, act_quant="dynamic", generate=False)
    assert eng.model.ops.sources["linear[fp8_block]"] == backend
    assert eng.model.ops.sources["moe_experts[fp8_block]"] == backend
    loose = _reference(ckpts, "fp8", act_quant="dynamic", generate=False)[1]
    same = loose
    if backend == "amd":  # the reference on the same e4m3fnuz weights (cpu_ref takes the fp8 dtype from them)
        ref = dsv3.load(ckpts["fp8"], backend="cpu_ref", dtype="float32", act_quant="dynamic", progress=False)
        apply_scale_fmt_and_prepare(ref.model, None, eng.model.backend_info.prepare_weight)
        assert ref.model.layers[0].attn.wq_a.weight.dtype == torch.float8_e4m3fnuz
        same = ref.logits([PROMPTS[0]])
    assert_within_max(logits, same, 1e-3, "logits")
    rel_rms = ((logits - loose).pow(2).mean().sqrt() / loose.pow(2).mean().sqrt()).item()
    assert rel_rms <= 0.1, f"relative RMS difference to cpu_ref on e4m3fn weights {rel_rms:.3f}"


@pytest.mark.parametrize("backend", ["nvidia", "amd"])
def test_cli_run_interpreted(ckpts, backend, capsys):
    args = ["run", "--backend", backend, "--ckpt-path", str(ckpts["hp"]), "--prompt", "the cat sat"]
    args += ["--dtype", "float32", "--temperature", "0", "--max-new-tokens", "3", "--output-format", "jsonl"]
    assert dsv3_main(args) == 0
    out = capsys.readouterr()
    record = json.loads(out.out.strip().splitlines()[-1])
    assert len(record["token_ids"]) == 3
    assert f"backend {backend} falls back to cpu_ref for: embedding" in out.err
    assert dsv3_main([*args[:2], "cpu_ref", *args[3:]]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["token_ids"] == record["token_ids"]


PLUGIN_IMPORT_CHECK = (
    "import sys\n"
    "from dsv3.backends.nvidia import plugin as nv\n"
    "from dsv3.backends.amd import plugin as amd\n"
    "from dsv3.hookspecs import OpRequest\n"
    "nv.dsv3_backend_info(); amd.dsv3_backend_info()\n"
    "assert nv.dsv3_op_linear(OpRequest(fmt='fp8_block', act_quant='dynamic')) is not None\n"
    "print(sorted(m for m in sys.modules if m == 'triton' or m.startswith('dsv3.backends.triton_kernels.')))\n"
)


@pytest.fixture(scope="module")
def without_interpreter(ckpts):
    """Run, at the same time, subprocesses with TRITON_INTERPRET unset: ``dsv3 backends``, ``dsv3 run``
    on each GPU backend, and an import of both plugins. Returns name -> CompletedProcess."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), env.get("PYTHONPATH")]))
    run = [sys.executable, "-m", "dsv3", "run", "--ckpt-path", str(ckpts["hp"]), "--prompt", "a", "--backend"]
    commands = {
        "backends": [sys.executable, "-m", "dsv3", "backends"],
        "run nvidia": [*run, "nvidia"],
        "run amd": [*run, "amd"],
        "import": [sys.executable, "-c", PLUGIN_IMPORT_CHECK],
    }
    procs = {
        name: subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for name, cmd in commands.items()
    }
    done = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=600)
        done[name] = subprocess.CompletedProcess(commands[name], proc.returncode, out, err)
    return done


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the backends are usable here")
def test_without_gpu_or_interpreter_backends_say_why(without_interpreter):
    listing = without_interpreter["backends"]
    assert listing.returncode == 0, listing.stderr
    nv = "nvidia: NOT usable: no CUDA device visible (torch.cuda.is_available() is False) and TRITON_INTERPRET is not set"
    assert nv in listing.stdout
    assert "amd: NOT usable: this torch is not a ROCm build (torch.version.hip is None)" in listing.stdout
    # the coverage table still shows what the kernels implement
    nv_block = listing.stdout.split("nvidia: NOT usable")[1]
    assert re.search(r"linear\s+hp/none fp8_block/none int8_w8a8/none int8_wo/none", nv_block)
    assert "fp8_block/dynamic" in nv_block and re.search(r"mla_latent_attention\s+-", nv_block)
    for backend, reason in (("nvidia", "no CUDA device visible"), ("amd", "not a ROCm build")):
        run = without_interpreter[f"run {backend}"]
        assert run.returncode == 2
        assert f"dsv3: error: backend {backend!r} is not usable on this machine" in run.stderr
        assert reason in run.stderr
        assert "Traceback" not in run.stderr


def test_plugins_import_no_kernels_and_no_triton_without_a_gpu(without_interpreter):
    """Importing the plugins and asking them about themselves compiles nothing; without a GPU
    (and without the interpreter) it does not even import triton."""
    done = without_interpreter["import"]
    assert done.returncode == 0, done.stderr
    loaded = set(eval(done.stdout.strip()))  # a printed list of module names
    # the kernel library's modules that import no triton
    no_triton = ("graph_capture", "ops", "plugin_hooks", "runtime", "target")
    assert loaded - {"triton"} == {f"dsv3.backends.triton_kernels.{name}" for name in no_triton}
    if not torch.cuda.is_available():
        assert "triton" not in loaded
