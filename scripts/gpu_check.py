#!/usr/bin/env python3
"""One prepared check of the nvidia backend's kernels on one GPU (H100/H200 class), in < 6 minutes.

    pip install --no-deps -e .            # on the GPU machine: torch and triton are already there
    python scripts/gpu_check.py           # prints tables; with OUT=dir also writes $OUT/gpu_check.json
    python scripts/gpu_check.py --smoke   # tiny shapes on the CPU through TRITON_INTERPRET=1 (tests this script)

Sections, each guarded (an error is printed with its traceback and the next section runs):

1. parity: every Triton kernel against cpu_ref run on the same GPU tensors (cpu_ref is plain
   PyTorch): activation quantization and dequantization bit for bit, GEMMs / MoE / MLA / norms
   within the tolerances of tests/backends/test_triton_kernels.py, at DeepSeek-V3's real sizes.
2. gemm: TFLOP/s on DeepSeek-V3's projection shapes (q_a, q_b, kv_a, o, expert gate/up, down) for
   M in {1, 16, 128, 4096} tokens: torch bf16 matmul, the Triton fp8 block-scaled GEMM (alone and
   with activation quantization), torch._scaled_mm (block scales, and per-row scales as a peer),
   the fp8 weight-only GEMM (act-quant none), the Triton int8 GEMM and torch._int_mm.
3. moe: the grouped routed-expert GEMMs (256 experts, top-8, 7168 -> 2048 -> 7168) against torch
   bf16 matmuls of the same FLOPs as one dense problem (the ideal of perfect batching).
4. prefill: one layer's prefill attention at T = S in both MLA forms (naive: wkv_b GEMM + the Triton
   flash attention; absorbed: the Triton latent attention), with torch SDPA as the peer.
5. decode: end-to-end decode tokens/s, eager and CUDA-graph replayed, of a small random DeepSeek-V3-shaped
   model on the nvidia backend against cpu_ref on the same GPU, in bf16 and fp8 (act-quant none and dynamic).

The JSON holds every figure and every error; it is rewritten after each section, so a run cut short
keeps what it measured. ``--budget-s`` bounds the time: benchmarks past it are reported as skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback

T0 = time.perf_counter()
V3_SHAPES = [  # (name, N = out features, K = in features)
    ("q_a 7168->1536", 1536, 7168),
    ("q_b 1536->24576", 24576, 1536),
    ("kv_a 7168->576", 576, 7168),
    ("o 16384->7168", 7168, 16384),
    ("expert gate/up 7168->2048", 2048, 7168),
    ("expert down 2048->7168", 7168, 2048),
]
SMOKE_SHAPES = [("q_a-like 200->136", 136, 200), ("kv_a-like 256->72", 72, 256)]


def log(*parts) -> None:
    print(*parts, flush=True)


def table(title: str, rows: list[dict], columns: list[str]) -> None:
    """Print rows as an aligned text table."""
    log(f"\n== {title}")
    if not rows:
        log("(no rows)")
        return
    cells = [[_fmt(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    log("  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)))
    for row in cells:
        log("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0 or 1e-2 <= abs(v) < 1e5:
            return f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
        return f"{v:.2e}"
    return str(v)


class Check:
    """Shared state: device, timing, time budget, results and where they are saved."""

    def __init__(self, args):
        import torch

        self.torch = torch
        self.args = args
        self.smoke = args.smoke
        self.device = torch.device("cpu" if self.smoke else "cuda")
        self.budget = args.budget_s
        self.results: dict = {"sections": {}, "errors": []}
        out_dir = os.environ.get("OUT")
        self.json_path = args.json or (os.path.join(out_dir, "gpu_check.json") if out_dir else None)

    def elapsed(self) -> float:
        return time.perf_counter() - T0

    def over_budget(self) -> bool:
        return self.elapsed() > self.budget

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()

    def time_ms(self, fn) -> float:
        """Median milliseconds of one call (after a warm-up call that also compiles)."""
        fn()
        self.sync()
        if self.device.type == "cuda":
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=5, rep=20, return_mode="median"))
        t = time.perf_counter()  # the interpreter: one timed call is all the smoke test needs
        fn()
        return (time.perf_counter() - t) * 1e3

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed(), 1)
        if self.json_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.json_path)), exist_ok=True)
            with open(self.json_path, "w") as f:
                json.dump(self.results, f, indent=1, default=str)

    def section(self, name: str, fn) -> None:
        log(f"\n######## {name}  (t = {self.elapsed():.0f} s)")
        start = time.perf_counter()
        try:
            fn()
            status = "ok"
        except Exception as exc:  # keep going: the next section may still work
            status = f"error: {type(exc).__name__}: {exc}"
            log(f"!! section {name} failed:\n{traceback.format_exc()}")
            self.results["errors"].append({"section": name, "error": status, "traceback": traceback.format_exc()})
        self.results["sections"].setdefault(name, {})["status"] = status
        self.results["sections"][name]["seconds"] = round(time.perf_counter() - start, 1)
        self.save()


# ----------------------------------------------------------------------------------------- helpers
def rel_err(got, want) -> float:
    d = (got.double() - want.double()).abs().max().item()
    return d / max(want.double().abs().max().item(), 1e-30)


def random_fp8(torch, shape, dtype, device, gen):
    """Random fp8 codes of moderate magnitude (|v| <= 30, never NaN), made without a float copy."""
    codes = torch.randint(0, 0x58, shape, dtype=torch.uint8, device=device, generator=gen)
    sign = torch.randint(0, 2, shape, dtype=torch.uint8, device=device, generator=gen) << 7
    return (codes | sign).view(dtype)


def environment(ck: Check) -> None:
    torch = ck.torch
    from dsv3.backends.triton_kernels import ops

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "interpreter": ops.interpreting(),
        "argv": sys.argv[1:],
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:
        info["triton"] = f"not importable: {exc}"
    if ck.device.type == "cuda":
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, capability=".".join(map(str, torch.cuda.get_device_capability(0))))
        info.update(sms=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
    from dsv3 import registry

    nv = registry.discover().get("nvidia")
    info["nvidia_backend"] = (
        "usable" if nv and nv.unusable_reason is None else (nv.unusable_reason if nv else "missing")
    )
    for kind in ("fp8", "int8"):
        ok, why = ops.fast_path_status(kind)
        info[f"{kind}_vendor_gemm"] = f"{'used' if ok else 'not used'} ({why})"
    ck.results["environment"] = info
    for k, v in info.items():
        log(f"{k:>18}: {v}")


# ----------------------------------------------------------------------------------------- 1. parity
def parity(ck: Check) -> None:
    torch = ck.torch
    from dsv3.backends.cpu_ref import attention as ref_att
    from dsv3.backends.cpu_ref import basic as ref_basic
    from dsv3.backends.cpu_ref import quant as ref
    from dsv3.backends.cpu_ref.moe import moe_experts_with
    from dsv3.backends.triton_kernels import ops
    from dsv3.backends.triton_kernels.target import AMD, NVIDIA
    from dsv3.hookspecs import OpRequest
    from dsv3.weights import Weight

    k = ops._k()
    dev, bf16, f8 = ck.device, torch.bfloat16, torch.float8_e4m3fn
    g = torch.Generator(device=dev).manual_seed(0)
    smoke = ck.smoke
    D, Q, FF = (200, 136, 72) if smoke else (7168, 1536, 2048)  # hidden, q_lora rank, expert width
    rows: list[dict] = []

    def randn(*shape, scale=1.0, dtype=bf16):
        return (torch.randn(*shape, generator=g, device=dev) * scale).to(dtype)

    def case(kernel: str, what: str, fn, tol: float | None) -> None:
        if ck.over_budget():
            rows.append({"kernel": kernel, "case": what, "result": "skipped (time budget)"})
            return
        t = time.perf_counter()
        try:
            err, path = fn()
            ok = err == 0 if tol is None else err <= tol
            rows.append({"kernel": kernel, "case": what, "max_rel_err": err, "tolerance": "exact" if tol is None else tol,
                         "result": "PASS" if ok else "FAIL", "path": path, "s": time.perf_counter() - t})  # fmt: skip
        except Exception as exc:
            rows.append({"kernel": kernel, "case": what, "result": f"ERROR {type(exc).__name__}: {str(exc)[:160]}"})
        log(f"  {kernel:<24} {what:<40} {rows[-1]['result']}")

    def aq_fp8(m, kk, fp8, sf):
        x = randn(m, kk) * torch.exp2(torch.randint(-8, 8, (m, kk), generator=g, device=dev)).to(bf16)
        q, s = k.quant.act_quant_fp8(x, fp8, sf)
        qr, sr = ref.quantize_act_fp8(x, 128, fp8, sf)
        bad = (q.view(torch.uint8) != qr.view(torch.uint8)).sum().item() + (s != sr).sum().item()
        return float(bad), "triton"

    for fp8 in (f8, torch.float8_e4m3fnuz):
        for sf in (None, "ue8m0"):
            name = f"{str(fp8).replace('torch.float8_', '')}/{sf or 'fp32 scales'}"
            if fp8 == torch.float8_e4m3fnuz:
                name += " (AMD's format)"
            case("act_quant_fp8", f"(33, {D}) {name}", lambda fp8=fp8, sf=sf: aq_fp8(33, D, fp8, sf), None)

    def aq_int8():
        x = randn(33, D, scale=3.0)
        q, s = k.quant.act_quant_int8(x)
        qr, sr = ref.quantize_act_int8(x)
        return float((q != qr).sum().item() + (s != sr).sum().item()), "triton"

    case("act_quant_int8", f"(33, {D})", aq_int8, None)

    w_fp8 = ref.quantize_weight_fp8(randn(Q, D, scale=D**-0.5, dtype=torch.float32))
    w_int8 = ref.quantize_weight_int8(randn(Q, D, scale=D**-0.5, dtype=torch.float32))
    case("dequantize", f"fp8_block ({Q}, {D}) -> bf16",
         lambda: (float((ops.dequantize(w_fp8, bf16) != ref.dequantize(w_fp8, bf16)).sum().item()), "triton"), None)  # fmt: skip
    case("dequantize", f"int8 ({Q}, {D}) -> bf16",
         lambda: (float((ops.dequantize(w_int8, bf16) != ref.dequantize(w_int8, bf16)).sum().item()), "triton"), None)  # fmt: skip

    for m in (1, 16, 128):
        x = randn(m, D)

        def fp8_dyn(x=x, m=m):
            got = ops.build_linear(OpRequest("fp8_block", "dynamic", bf16), NVIDIA)(x, w_fp8)
            fast = ops.vendor_min_m("fp8") is not None and ops._fast_ok_shape("fp8", m, Q, D, ops.vendor_min_m("fp8"))
            path = "torch._scaled_mm" if fast and ops.fast_path_status("fp8")[0] else "triton"
            return rel_err(got, ref.linear_fp8_dynamic(x, w_fp8)), path

        def int8_dyn(x=x, m=m):
            got = ops.build_linear(OpRequest("int8_w8a8", "dynamic", bf16), NVIDIA)(x, w_int8)
            fast = ops.vendor_min_m("int8") is not None and ops._fast_ok_shape(
                "int8", m, Q, D, ops.vendor_min_m("int8")
            )
            path = "torch._int_mm" if fast and ops.fast_path_status("int8")[0] else "triton"
            return rel_err(got, ref.linear_int8_dynamic(x, w_int8)), path

        def fp8_none(x=x):
            got = ops.build_linear(OpRequest("fp8_block", "none", bf16), AMD)(x, w_fp8)
            return rel_err(got, ref.linear_dequant(x, w_fp8)), "triton"

        case("linear fp8 dynamic", f"M={m} ({Q}, {D})", fp8_dyn, 1e-2)
        case("linear int8 dynamic", f"M={m} ({Q}, {D})", int8_dyn, 1e-2)
        case("linear fp8 weight-only", f"M={m} ({Q}, {D})", fp8_none, 1e-2)

    def fp8_gemm_fp32_out():  # fp32 output: only summation order differs
        x = randn(16, D)
        qa, sa = k.quant.act_quant_fp8(x)
        got = k.gemm.fp8_block_gemm(qa, sa, w_fp8.data, w_fp8.scale, torch.float32)
        return rel_err(got, ref.linear_fp8_dynamic(x.float(), w_fp8)), "triton"

    case("fp8_block_gemm", f"M=16 ({Q}, {D}) fp32 out", fp8_gemm_fp32_out, 1e-5)

    E, top, n_tok, off = (6, 2, 5, 2) if smoke else (32, 8, 16, 32)
    ids = torch.rand(n_tok, 4 * E if not smoke else 10, generator=g, device=dev).topk(top, dim=-1).indices
    weights = torch.rand(n_tok, top, generator=g, device=dev)
    xm = randn(n_tok, D)
    dense = [randn(E, o, i, scale=i**-0.5, dtype=torch.float32) for o, i in ((FF, D), (FF, D), (D, FF))]
    for fmt, aq in (("fp8_block", "dynamic"), ("fp8_block", "none"), ("hp", "none"), ("int8_w8a8", "dynamic")):
        if fmt == "hp":
            ws = [Weight(w.to(bf16)) for w in dense]
        elif fmt == "fp8_block":
            ws = [ref.quantize_weight_fp8(w) for w in dense]
        else:
            ws = [ref.quantize_weight_int8(w) for w in dense]

        def moe_case(ws=ws, fmt=fmt, aq=aq):
            got = ops.build_moe_experts(OpRequest(fmt, aq, bf16), AMD)(xm, weights, ids, *ws, off)
            want = moe_experts_with(ref.linear_for(fmt, aq))(xm, weights, ids, *ws, off)
            return rel_err(got, want), "triton"

        case("moe_experts", f"{fmt}/{aq} N={n_tok} E={E} top-{top} ({D}->{FF})", moe_case, 1e-2)

    H, C, R, S = (5, 24, 8, 40) if smoke else (128, 512, 64, 1000)
    for b, t in ((2, 1), (1, 4)):

        def mla_case(b=b, t=t):
            ql, qp = randn(b, t, H, C), randn(b, t, H, R)
            kv, pe = randn(b, S + 7, C)[:, :S], randn(b, S, R)
            pos = torch.randint(S // 2, S, (b, t), generator=g, device=dev)
            got = ops.mla_latent_attention(ql, qp, kv, pe, pos, 0.1)
            return rel_err(got, ref_att.mla_latent_attention(ql, qp, kv, pe, pos, 0.1)), "triton"

        case("mla_latent_attention", f"B={b} T={t} H={H} C={C} R={R} S={S}", mla_case, 2e-2)

    DQK, DV, TP = (24, 16, 40) if smoke else (192, 128, 512)

    def attention_case():
        q, kk, v = randn(1, TP, H, DQK), randn(1, TP, H, DQK), randn(1, TP, H, DV)
        pos = torch.arange(TP, device=dev).view(1, TP)
        return rel_err(ops.attention(q, kk, v, pos, 0.1), ref_att.attention(q, kk, v, pos, 0.1)), "triton"

    case("attention (naive prefill)", f"T=S={TP} H={H} Dqk={DQK} Dv={DV}", attention_case, 2e-2)

    xn, wn = randn(33, D, scale=2.0), randn(D)
    case("rms_norm", f"(33, {D}) bf16", lambda: (rel_err(ops.rms_norm(xn, wn, 1e-6), ref_basic.rms_norm(xn, wn, 1e-6)), "triton"), 1e-2)  # fmt: skip
    gate, up = randn(33, FF, scale=3.0), randn(33, FF)
    case("silu_and_mul", f"(33, {FF}) bf16", lambda: (rel_err(ops.silu_and_mul(gate, up), ref_basic.silu_and_mul(gate, up)), "triton"), 1e-2)  # fmt: skip

    ck.results["sections"]["parity"] = {"rows": rows}
    table("kernel parity against cpu_ref on the same device", rows,
          ["kernel", "case", "max_rel_err", "tolerance", "result", "path"])  # fmt: skip
    fails = [r for r in rows if r.get("result") != "PASS"]
    log(f"parity: {len(rows) - len(fails)}/{len(rows)} PASS")


# ----------------------------------------------------------------------------------------- 2. GEMMs
def gemm(ck: Check) -> None:
    torch = ck.torch
    from dsv3.backends.triton_kernels import ops

    k = ops._k()
    dev, bf16, f8 = ck.device, torch.bfloat16, torch.float8_e4m3fn
    g = torch.Generator(device=dev).manual_seed(1)
    shapes = SMOKE_SHAPES if ck.smoke else V3_SHAPES
    ms = (1, 16) if ck.smoke else (1, 16, 128, 4096)
    rows: list[dict] = []
    for name, n, kk in shapes:
        w_bf16 = (torch.randn(n, kk, generator=g, device=dev) * kk**-0.5).to(bf16)
        wq = random_fp8(torch, (n, kk), f8, dev, g)
        ws = torch.rand(-(-n // 128), -(-kk // 128), generator=g, device=dev) * 1e-2 + 1e-3
        wi = torch.randint(-127, 128, (n, kk), dtype=torch.int8, device=dev, generator=g)
        wis = torch.rand(n, generator=g, device=dev) * 1e-2 + 1e-3
        wq_row = random_fp8(torch, (n, kk), f8, dev, g)
        for m in ms:
            if ck.over_budget():
                rows.append({"shape": name, "M": m, "method": "all", "note": "skipped (time budget)"})
                continue
            x = torch.randn(m, kk, generator=g, device=dev).to(bf16)
            qa, sa = k.quant.act_quant_fp8(x)
            qi, si = k.quant.act_quant_int8(x)
            flops = 2.0 * m * n * kk
            ones_a, ones_b = torch.ones(m, 1, device=dev), torch.ones(1, n, device=dev)
            methods = {
                "bf16 torch.matmul": lambda x=x, w=w_bf16: x @ w.t(),
                "fp8 triton GEMM": lambda qa=qa, sa=sa, w=wq, s=ws: k.gemm.fp8_block_gemm(qa, sa, w, s, bf16),
                "fp8 triton quant+GEMM": lambda x=x, w=wq, s=ws: k.gemm.fp8_block_gemm(
                    *k.quant.act_quant_fp8(x), w, s, bf16
                ),
                "fp8 _scaled_mm block": lambda qa=qa, sa=sa, w=wq, s=ws: ops._scaled_mm_fp8_block(qa, sa, w, s, bf16),
                "fp8 _scaled_mm rowwise": lambda qa=qa, w=wq_row, one_a=ones_a, one_b=ones_b: torch._scaled_mm(
                    qa, w.t(), scale_a=one_a, scale_b=one_b, out_dtype=bf16
                ),
                "fp8 weight-only triton": lambda x=x, w=wq, s=ws: k.gemm.weight_gemm(x, w, s, "fp8_block"),
                "int8 triton GEMM": lambda qi=qi, si=si, w=wi, s=wis: k.gemm.int8_gemm(qi, si, w, s, bf16),
                "int8 torch._int_mm": lambda qi=qi, si=si, w=wi, s=wis: ops._int_mm_int8(qi, si, w, s, bf16),
            }
            if ck.smoke:  # the interpreter is slow: the Triton paths and the torch peers once each
                methods = {key: fn for key, fn in methods.items() if "quant+GEMM" not in key}
            for method, fn in methods.items():
                row = {"shape": name, "M": m, "N": n, "K": kk, "method": method}
                try:
                    ms_ = ck.time_ms(fn)
                    row.update(ms=ms_, tflops=flops / ms_ / 1e9)
                except Exception as exc:
                    row["note"] = f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
                rows.append(row)
            best = {r["method"]: r.get("tflops") for r in rows if r["shape"] == name and r["M"] == m}
            log(
                f"  {name:<26} M={m:<5} "
                + "  ".join(f"{key.split(' ')[0]}/{key.split(' ', 1)[1]}={_fmt(v)}" for key, v in best.items())
            )
    ck.results["sections"]["gemm"] = {"rows": rows}
    table("GEMM TFLOP/s (2*M*N*K / time; fp8 = e4m3fn, block scales 1x128 x 128x128; int8 per token x per channel)",
          rows, ["shape", "M", "method", "ms", "tflops", "note"])  # fmt: skip


# ----------------------------------------------------------------------------------------- 3. MoE
def moe(ck: Check) -> None:
    torch = ck.torch
    from dsv3.backends.triton_kernels import ops
    from dsv3.weights import Weight

    dev, bf16, f8 = ck.device, torch.bfloat16, torch.float8_e4m3fn
    g = torch.Generator(device=dev).manual_seed(2)
    E, top, D, FF = (8, 2, 200, 136) if ck.smoke else (256, 8, 7168, 2048)
    tokens = (1, 16) if ck.smoke else (1, 16, 128, 4096)
    rows: list[dict] = []

    def fp8_weight(o, i):
        sc = torch.rand(E, -(-o // 128), -(-i // 128), generator=g, device=dev) * 1e-2 + 1e-3
        return Weight(random_fp8(torch, (E, o, i), f8, dev, g), "fp8_block", sc)

    w = [fp8_weight(FF, D), fp8_weight(FF, D), fp8_weight(D, FF)]
    moe_fn = ops._k().moe.moe_experts
    # the same FLOPs as one dense problem, in bf16: gate+up (D -> 2I) and down (FF -> D)
    w13 = (torch.randn(2 * FF, D, generator=g, device=dev) * D**-0.5).to(bf16)
    w2 = (torch.randn(D, FF, generator=g, device=dev) * FF**-0.5).to(bf16)
    for n in tokens:
        if ck.over_budget():
            rows.append({"tokens": n, "method": "all", "note": "skipped (time budget)"})
            continue
        x = torch.randn(n, D, generator=g, device=dev).to(bf16)
        ids = torch.rand(n, E, generator=g, device=dev).topk(top, dim=-1).indices
        weights = torch.rand(n, top, generator=g, device=dev)
        flops = 2.0 * n * top * 3 * D * FF
        touched = ids.unique().numel() * 3 * D * FF  # fp8 weight bytes read at least once
        xa = torch.randn(n * top, D, generator=g, device=dev).to(bf16)
        ha = torch.randn(n * top, FF, generator=g, device=dev).to(bf16)
        methods = {
            "fp8 dynamic (grouped Triton)": lambda x=x, ids=ids, wt=weights: moe_fn(x, wt, ids, *w, 0, "dynamic"),
            "fp8 weight-only (grouped Triton)": lambda x=x, ids=ids, wt=weights: moe_fn(x, wt, ids, *w, 0, "none"),
            "bf16 dense-equivalent torch.matmul": lambda xa=xa, ha=ha: (xa @ w13.t(), ha @ w2.t()),
        }
        for method, fn in methods.items():
            row = {"tokens": n, "assignments": n * top, "experts_hit": ids.unique().numel(), "method": method}
            try:
                ms_ = ck.time_ms(fn)
                row.update(ms=ms_, tflops=flops / ms_ / 1e9)
                if "fp8" in method:
                    row["weight_GB_s"] = touched / ms_ / 1e6
            except Exception as exc:
                row["note"] = f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:90]}"
            rows.append(row)
            log(f"  tokens={n:<5} {method:<36} {_fmt(row.get('tflops'))} TFLOP/s {row.get('note', '')}")
    ck.results["sections"]["moe"] = {"rows": rows, "experts": E, "top_k": top, "dim": D, "inter": FF}
    table(f"MoE routed experts: E={E}, top-{top}, {D} -> {FF} -> {D} (TFLOP/s = 6*D*FF*tokens*k / time)", rows,
          ["tokens", "experts_hit", "method", "ms", "tflops", "weight_GB_s", "note"])  # fmt: skip


# ----------------------------------------------------------------------------------------- 4. decode
DECODE_CONFIG = dict(
    model_type="deepseek_v3", vocab_size=32768, hidden_size=2048, intermediate_size=5632, moe_intermediate_size=1024,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=16, num_key_value_heads=16,
    n_shared_experts=1, n_routed_experts=64, num_experts_per_tok=6, n_group=8, topk_group=4,
    q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    max_position_embeddings=4096, rope_theta=10000.0, routed_scaling_factor=2.5, norm_topk_prob=True,
    num_nextn_predict_layers=0, bos_token_id=0, eos_token_id=1,
)  # fmt: skip
SMOKE_DECODE = dict(
    DECODE_CONFIG, vocab_size=96, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8, num_experts_per_tok=2, n_group=2,
    topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
    max_position_embeddings=128,
)  # fmt: skip
PROJECTIONS = ("wq_a", "wq_b", "wq", "wkv_a", "wkv_b", "wo", "w1", "w2", "w3")


def build_random(ck: Check, cfg, backend: str, fmt: str, act_quant: str, seed: int = 0):
    """A model with random weights (std 0.02) on the device; projections in ``fmt`` (fp8 quantized by cpu_ref)."""
    torch = ck.torch
    from dsv3.model.graph import Linear, MoE, RMSNorm
    from dsv3.quantize import quantize_weight
    from dsv3.runtime.loading import build_model

    def fmt_of(path: str) -> str:
        return fmt if path.split(".")[-1] in PROJECTIONS else "hp"

    formats = ("hp",) if fmt == "hp" else ("hp", fmt)
    model = build_model(cfg, backend, "bfloat16", "absorb", act_quant, formats, fmt_of, device=str(ck.device))
    g = torch.Generator(device=ck.device).manual_seed(seed)
    with torch.no_grad():
        model.embed.normal_(0.0, 1.0, generator=g)
        for mod in model.modules():
            if isinstance(mod, RMSNorm):
                mod.weight.fill_(1.0)
            elif isinstance(mod, Linear):
                w = torch.randn(mod.weight.shape, generator=g, device=ck.device) * 0.02
                if mod.fmt == "hp":
                    mod.weight.copy_(w)
                else:
                    q = quantize_weight(w, mod.fmt)
                    mod.weight.copy_(q.data)
                    mod.scale.copy_(q.scale)
            elif isinstance(mod, MoE):
                mod.gate_weight.normal_(0.0, 0.02, generator=g)
                if mod.gate_bias is not None:
                    mod.gate_bias.normal_(0.0, 0.01, generator=g)
    return model.eval()


def decode_rate(
    ck: Check, model, batch: int, prompt: int, steps: int, captured: bool
) -> tuple[float, object, list, dict]:
    """Decode tokens/s after a prompt of ``prompt`` tokens (two warm-up steps first, which capture the graph
    when ``captured`` and the backend captures), the first logits, the greedy tokens and the graph counters."""
    torch = ck.torch
    from dsv3.runtime.graphs import DecodeGraphs, backend_capture

    dev = ck.device
    g = torch.Generator(device=dev).manual_seed(3)
    with torch.inference_mode():
        cache = model.new_cache(batch + 1, prompt + steps + 2)  # row ``batch``: the graphs' padding row
        capture = backend_capture(model) if captured else None
        graphs = DecodeGraphs(model, cache, pad_row=batch, max_batch=batch, capture=capture)
        tokens = torch.randint(2, model.cfg.vocab_size, (batch, prompt), generator=g, device=dev)
        hidden = model(tokens, torch.arange(prompt, device=dev).expand(batch, prompt), cache)[:, -1]
        first = model.logits(hidden)
        nxt = first.argmax(-1)
        pos = prompt
        out = [nxt]
        for _ in range(2):  # compiles every kernel of the decode step (and captures it)
            nxt, pos = graphs(nxt, torch.full((batch,), pos, device=dev), None).argmax(-1), pos + 1
            out.append(nxt)
        ck.sync()
        t = time.perf_counter()
        for _ in range(steps):
            nxt, pos = graphs(nxt, torch.full((batch,), pos, device=dev), None).argmax(-1), pos + 1
            out.append(nxt)
        ck.sync()
        rate = batch * steps / (time.perf_counter() - t)
    return rate, first, torch.stack(out, 1).tolist(), graphs.stats()


def decode(ck: Check) -> None:
    from dsv3.model.config import config_from_dict

    cfg = config_from_dict(SMOKE_DECODE if ck.smoke else DECODE_CONFIG, source="gpu_check decode config")
    prompt, steps = (4, 2) if ck.smoke else (64, 24)
    batches = (1,) if ck.smoke else (1, 16)
    rows: list[dict] = []
    for fmt, aq in (("hp", "none"), ("fp8_block", "none"), ("fp8_block", "dynamic")):
        firsts = {}
        for backend, modes in (("nvidia", ("eager", "graph")), ("cpu_ref", ("eager",))):
            if ck.over_budget():
                rows.append({"format": fmt, "act_quant": aq, "backend": backend, "note": "skipped (time budget)"})
                continue
            try:
                model = build_random(ck, cfg, backend, fmt, aq)
                for b in batches:
                    eager_tokens = None
                    for mode in modes:
                        rate, first, toks, stats = decode_rate(ck, model, b, prompt, steps, mode == "graph")
                        firsts.setdefault(b, {})[backend] = first
                        row = {"format": fmt, "act_quant": aq, "backend": backend, "batch": b, "mode": mode}
                        row.update(tokens_per_s=rate, graph_replays=stats["graph_replays"])
                        if mode == "eager":
                            eager_tokens = toks
                        else:  # greedy tokens of the replayed steps against the eager ones, same weights
                            row["tokens_equal_eager"] = toks == eager_tokens
                            row["note"] = "; ".join(f"{k} {v}" for k, v in stats.items() if k.endswith("buckets") and v)
                        rows.append(row)
                        log(f"  {fmt}/{aq:<8} {backend:<8} batch {b:<3} {mode:<5} {rate:9.1f} tokens/s {stats}")
                del model
            except Exception as exc:
                rows.append(
                    {"format": fmt, "act_quant": aq, "backend": backend, "note": f"error: {type(exc).__name__}: {exc}"}
                )
                log(f"  {fmt}/{aq} {backend}: {traceback.format_exc()}")
        for b, f in firsts.items():  # the two backends ran the same weights: their prefill logits agree
            if len(f) == 2:
                err = rel_err(f["nvidia"].float(), f["cpu_ref"].float())
                for r in rows:
                    if (r.get("format"), r.get("act_quant"), r.get("batch"), r.get("backend")) == (
                        fmt,
                        aq,
                        b,
                        "nvidia",
                    ):
                        r["prefill_logits_rel_diff_vs_cpu_ref"] = err
    ck.results["sections"]["decode"] = {"rows": rows, "prompt": prompt, "steps": steps, "config": dict(
        hidden=cfg.hidden_size, layers=cfg.num_hidden_layers, experts=cfg.n_routed_experts, top_k=cfg.num_experts_per_tok)}  # fmt: skip
    table(f"decode tokens/s (bf16 activations; {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.n_routed_experts} experts top-{cfg.num_experts_per_tok}; prompt {prompt}, {steps} timed steps; "
          "graph: CUDA graph replay, eager fallback where capture is absent or failed)",
          rows, ["format", "act_quant", "backend", "batch", "mode", "tokens_per_s", "graph_replays", "tokens_equal_eager",
                 "prefill_logits_rel_diff_vs_cpu_ref", "note"])  # fmt: skip


# ----------------------------------------------------------------------------------------- main
# ----------------------------------------------------------------------------------------- 4. prefill
def prefill(ck: Check) -> None:
    """One layer's prefill attention at T = S, both MLA forms as the model runs them (bf16, B = 1).

    naive: expand the latents through wkv_b (one bf16 GEMM) + the Triton flash attention.
    absorbed: absorb the queries, the Triton latent attention, un-absorb the outputs.
    The model picks naive for every fresh prefill (dsv3.model.graph.naive_is_cheaper); this shows whether
    the GPU agrees. torch's SDPA (causal, v zero-padded to Dqk) is the peer for the naive kernel.
    """
    torch = ck.torch
    import torch.nn.functional as F

    from dsv3.backends.triton_kernels import ops

    dev, bf16 = ck.device, torch.bfloat16
    g = torch.Generator(device=dev).manual_seed(3)
    H, C, R, DN, DV = (4, 24, 8, 16, 16) if ck.smoke else (128, 512, 64, 128, 128)
    lengths = (32,) if ck.smoke else (1024, 4096)
    rows: list[dict] = []

    def randn(*shape):
        return (torch.randn(*shape, generator=g, device=dev) * 0.5).to(bf16)

    wkv_b = randn(H * (DN + DV), C) * C**-0.5  # (H*(Dn+Dv), C)
    w = wkv_b.view(H, DN + DV, C)
    for n in lengths:
        if ck.over_budget():
            rows.append({"T=S": n, "method": "all", "note": "skipped (time budget)"})
            continue
        latent, k_pe = randn(1, n, C), randn(1, n, R)
        q_nope, q_pe = randn(1, n, H, DN), randn(1, n, H, R)
        pos = torch.arange(n, device=dev).view(1, n)

        def naive(latent=latent, k_pe=k_pe, q_nope=q_nope, q_pe=q_pe, pos=pos, n=n):
            kv = (latent @ wkv_b.t()).view(1, n, H, DN + DV)
            k = torch.cat([kv[..., :DN], k_pe.unsqueeze(2).expand(-1, -1, H, -1)], dim=-1)
            return ops.attention(torch.cat([q_nope, q_pe], dim=-1), k, kv[..., DN:], pos, 0.1)

        def absorbed(latent=latent, k_pe=k_pe, q_nope=q_nope, q_pe=q_pe, pos=pos):
            q_latent = torch.einsum("bthd,hdc->bthc", q_nope, w[:, :DN])
            o = ops.mla_latent_attention(q_latent, q_pe, latent, k_pe, pos, 0.1)
            return torch.einsum("bthc,hdc->bthd", o, w[:, DN:])

        qf, kf, vf = randn(1, H, n, DN + R), randn(1, H, n, DN + R), randn(1, H, n, DV)
        vpad = F.pad(vf, (0, DN + R - DV))
        methods = {
            "naive: wkv_b GEMM + Triton flash attention": naive,
            "absorbed: Triton latent attention (+ absorb/un-absorb)": absorbed,
            "torch SDPA causal (v padded to Dqk), attention only": lambda qf=qf, kf=kf, vpad=vpad: (
                F.scaled_dot_product_attention(qf, kf, vpad, is_causal=True, scale=0.1)
            ),
        }
        flops_naive = 2.0 * H * n * (n + 1) / 2 * (DN + R + DV)  # causal: half the (query, key) pairs
        for name, fn in methods.items():
            try:
                ms = ck.time_ms(fn)
                rows.append(
                    {"T=S": n, "method": name, "ms": ms, "attention TFLOP/s (naive count)": flops_naive / ms / 1e9}
                )
            except Exception as exc:
                rows.append({"T=S": n, "method": name, "note": f"ERROR {type(exc).__name__}: {str(exc)[:120]}"})
    ck.results["sections"]["prefill"] = {"rows": rows}
    table(f"prefill attention, one layer, H={H} C={C} R={R} Dnope={DN} Dv={DV}, bf16", rows,
          ["T=S", "method", "ms", "attention TFLOP/s (naive count)", "note"])  # fmt: skip


SECTIONS = {"parity": parity, "gemm": gemm, "moe": moe, "prefill": prefill, "decode": decode}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU through TRITON_INTERPRET=1")
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated subset of " + ",".join(SECTIONS)
    )
    parser.add_argument(
        "--budget-s", type=float, default=330.0, help="stop starting benchmarks after this many seconds"
    )
    parser.add_argument("--json", help="where to write the results (default: $OUT/gpu_check.json when OUT is set)")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the kernel modules are imported
    try:
        import torch
    except ImportError:
        log("gpu_check: torch is not installed")
        return 2
    try:
        import dsv3  # noqa: F401
    except ImportError:
        log("gpu_check: dsv3 is not importable: run `pip install --no-deps -e .` in the repository first")
        return 2
    if not args.smoke and not torch.cuda.is_available():
        log("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); use --smoke to test on the CPU")
        return 2
    chosen = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in SECTIONS]
    if unknown:
        log(f"gpu_check: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
        return 2
    ck = Check(args)
    ck.section("environment", lambda: environment(ck))
    for name in chosen:
        ck.section(name, lambda name=name: SECTIONS[name](ck))
    ck.save()
    status = {k: v.get("status") for k, v in ck.results["sections"].items()}
    log(f"\ngpu_check done in {ck.elapsed():.0f} s; sections: {status}")
    if ck.json_path:
        log(f"results: {ck.json_path}")
    return 0 if all(v == "ok" for v in status.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
