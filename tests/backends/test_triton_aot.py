"""The Triton kernels compile for real GPUs (NVIDIA sm_90, AMD gfx942) on a machine without one.

The interpreter checks what the kernels compute; it cannot tell whether Triton's compiler accepts
them for a GPU (layouts of fp8 / int8 ``tl.dot``, early returns, shared memory). This compiles the
main kernel configurations ahead of time, all the way to a cubin (ptxas) or hsaco, against a
stand-in driver that reports the target and launches nothing. It runs in a subprocess: the kernel
modules must be imported without TRITON_INTERPRET, and the stand-in driver must not leak into
other tests. Shared memory is checked against the smallest budget of the GPUs the backends aim at
(H100/H200: 227 KiB per block; MI300: 64 KiB of LDS).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

SHARED_LIMIT = {"sm90": 227 * 1024, "gfx942": 64 * 1024}


def compile_for(target_name: str) -> dict:
    """Compile a representative set of kernel configurations for ``target_name``; nothing is launched."""
    import torch
    from triton.backends.compiler import GPUTarget
    from triton.runtime.jit import JITFunction

    driver_module = sys.modules["triton.runtime.driver"]
    target = GPUTarget("cuda", 90, 32) if target_name == "sm90" else GPUTarget("hip", "gfx942", 64)

    class StandInDriver:
        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_current_target(self):
            return target

    driver_module.driver.set_active(StandInDriver())
    kernels: list[dict] = []
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        kernels.append({"kernel": self.fn.__name__, "shared": kernel.metadata.shared})
        return kernel

    JITFunction.run = compile_only
    from dsv3.backends.cpu_ref import quant as ref
    from dsv3.backends.triton_kernels import attention, dequant, gemm, mla, moe, norm, paged, quant

    for mod in (quant, dequant, gemm, moe, norm, mla, attention, paged):  # CPU tensors only stand for pointers here
        mod.check_device = lambda where, **tensors: torch.device("cpu")
    if target.backend == "hip":
        gemm.is_hip = lambda: True
        gemm.launch_opts = lambda warps, stages: {"num_warps": warps, "num_stages": min(stages, 2)}
        attention.launch_opts = gemm.launch_opts
        paged.launch_opts = gemm.launch_opts
    fp8 = torch.float8_e4m3fn if target.backend == "cuda" else torch.float8_e4m3fnuz
    bf16 = torch.bfloat16
    failures = []

    def attempt(name, fn):
        try:
            fn()
        except Exception as exc:
            failures.append(f"{name}: {type(exc).__name__}: {str(exc)[:2000]}")

    x = torch.randn(300, 1024).to(bf16)
    w = ref.quantize_weight_fp8(torch.randn(576, 1024) * 0.03, 128, fp8)
    wi = ref.quantize_weight_int8(torch.randn(576, 1024) * 0.03)
    attempt("act_quant_fp8", lambda: quant.act_quant_fp8(x, fp8, "ue8m0"))
    attempt("act_quant_int8", lambda: quant.act_quant_int8(x))
    attempt("dequantize fp8", lambda: dequant.dequantize_weight(w.data, w.scale, "fp8_block", bf16))
    for m in (1, 300):  # decode tiles (BLOCK_M 16) and prefill tiles (64 / 128)
        qa, sa = torch.zeros(m, 1024, dtype=fp8), torch.ones(m, 8)
        attempt(f"fp8_block_gemm M={m}", lambda qa=qa, sa=sa: gemm.fp8_block_gemm(qa, sa, w.data, w.scale, bf16))
    qi, si = torch.zeros(300, 1024, dtype=torch.int8), torch.ones(300)
    attempt("int8_gemm", lambda: gemm.int8_gemm(qi, si, wi.data, wi.scale, bf16))
    attempt("weight_gemm fp8 (act-quant none)", lambda: gemm.weight_gemm(x[:1], w.data, w.scale, "fp8_block"))
    e, d, inter = 8, 256, 128
    experts = [
        ref.quantize_weight_fp8(torch.randn(e, o, i) * 0.05, 128, fp8) for o, i in ((inter, d), (inter, d), (d, inter))
    ]
    ids = torch.rand(64, e).topk(2, -1).indices
    attempt("moe fp8 dynamic", lambda: moe.moe_experts(x[:64, :d], torch.rand(64, 2), ids, *experts, 0, "dynamic"))
    q_latent, q_pe = torch.randn(1, 1, 128, 512).to(bf16), torch.randn(1, 1, 128, 64).to(bf16)
    kv, pe = torch.randn(1, 1000, 512).to(bf16), torch.randn(1, 1000, 64).to(bf16)
    pos = torch.full((1, 1), 999)
    attempt("mla decode", lambda: mla.mla_latent_attention(q_latent, q_pe, kv, pe, pos, 0.1, num_splits=4))
    # the paged cache at V3's dims: pages of 64, 4 rows of up to 8 pages, decode (split-KV and not) and a chunk
    cache = torch.zeros(32, 64, 576, dtype=bf16)
    slots = torch.arange(300)
    attempt("paged_cache_write", lambda: paged.paged_cache_write(cache, kv[0, :300], pe[0, :300], slots))
    table, lens = torch.arange(32, dtype=torch.int32).view(4, 8), torch.full((4,), 500, dtype=torch.int32)
    for splits, t in ((4, 1), (1, 1), (1, 8)):
        ql, qp = q_latent.expand(4, t, -1, -1), q_pe.expand(4, t, -1, -1)
        attempt(
            f"mla paged T={t} splits={splits}",
            lambda ql=ql, qp=qp, splits=splits: paged.mla_paged_attention(ql, qp, cache, table, lens, 0.1, splits),
        )
    attempt(
        "mla paged fp32",
        lambda: paged.mla_paged_attention(q_latent.float(), q_pe.float(), cache.float(), table[:1], lens[:1], 0.1, 2),
    )
    prefill_pos = torch.arange(300).view(1, 300)
    for dt in (bf16, torch.float32):  # the naive-form prefill at V3's head dims (Dqk 192, Dv 128)
        q, v = torch.zeros(1, 300, 4, 192, dtype=dt), torch.zeros(1, 300, 4, 128, dtype=dt)
        attempt(f"attention prefill {dt}", lambda q=q, v=v: attention.attention(q, q, v, prefill_pos, 0.1))
    attempt("rms_norm", lambda: norm.rms_norm(x, torch.ones(1024, dtype=bf16), 1e-6))
    attempt("silu_and_mul", lambda: norm.silu_and_mul(x, x))
    return {"kernels": kernels, "failures": failures}


@pytest.mark.parametrize("target", ["sm90", "gfx942"])
def test_kernels_compile_for_gpu_targets(target):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).parents[2]), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, __file__, target], env=env, capture_output=True, text=True, timeout=900)
    if done.returncode == 3:
        pytest.skip(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["failures"] == []
    names = {k["kernel"] for k in result["kernels"]}
    assert {"_gemm_kernel", "_mla_kernel", "_attention_kernel", "_act_quant_fp8_kernel", "_rms_norm_kernel"} <= names
    assert {"_paged_mla_kernel", "_cache_write_kernel"} <= names
    biggest = max(result["kernels"], key=lambda k: k["shared"])
    assert biggest["shared"] <= SHARED_LIMIT[target], biggest


if __name__ == "__main__":
    try:
        outcome = compile_for(sys.argv[1])
    except (FileNotFoundError, RuntimeError) as exc:  # e.g. a triton build without ptxas for this platform
        print(f"cannot compile for {sys.argv[1]} here: {type(exc).__name__}: {exc}")
        sys.exit(3)
    print(json.dumps(outcome))
