"""The conformance kit itself: it passes correct backends and names the operator of a planted error.

Planted backends are plugin objects passed straight to ``run_conformance`` (no installation).
``Independent`` is a second implementation of every operator with different algorithms (online
softmax, complex-number RoPE, kernel-style blockwise fp8 GEMM with a reciprocal-multiply
quantizer, exact integer int8 GEMM, fused MoE experts with float32 intermediates, an
exponential-race sampler, routing ids in another order): it must pass, which shows the
tolerances are wide enough for a correct kernel, while the planted errors show they are narrow
enough to catch a wrong one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from dsv3 import registry
from dsv3.backends.cpu_ref import basic, moe, paged
from dsv3.cli import main as cli_main
from dsv3.conformance import run_conformance
from dsv3.hookspecs import CONTRACT_VERSION, BackendInfo, OpRequest, hookimpl
from dsv3.weights import AMAX_FLOOR, FORMATS, FP8_BLOCK, FP8_MAX, HP, INT8_W8A8, Weight


def planted(name: str, op: str, impl_for) -> registry.Backend:
    """A backend implementing only ``op``, with ``impl_for(request)`` as its hook (None declines)."""

    class Plugin:
        @hookimpl
        def dsv3_backend_info(self) -> BackendInfo:
            return BackendInfo(
                name=name,
                description=f"planted error in {op}",
                contract_version=CONTRACT_VERSION,
                formats=FORMATS,
            )

    def hook(self, request: OpRequest):
        return impl_for(request)

    setattr(Plugin, f"dsv3_op_{op}", hookimpl(hook))
    return registry.make_backend(Plugin(), name)


def failures_of(report) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for row in report.rows:
        for f in row.failures:
            out.setdefault(f"{row.op}[{row.label}] {row.dtype}", []).append(f)
    return out


# ---------------------------------------------------------------------------------------- correct backends
def test_cpu_ref_passes_against_itself():
    report = run_conformance("cpu_ref", quick=True)
    assert report.ok, "\n".join(report.failures())
    assert report.fallbacks == []
    tested = {row.op for row in report.rows}
    assert tested == set(registry.OP_NAMES)
    assert all(row.cases > 0 for row in report.rows)
    table = report.format_table()
    assert "PASS" in table and "moe_experts" in table and "fp8_block/dynamic" in table


@pytest.mark.parametrize("name", ["nvidia", "amd"])
def test_gpu_backends_pass_under_the_triton_interpreter(name, monkeypatch):
    """The GPU backends' Triton kernels, interpreted on CPU tensors. The interpreter is slow (the whole
    quick kit took ~50 s per backend on 2 cores, measured; this subset ~5 s), so CI runs float32 (the
    tighter tolerances) without the 671B-shaped cases; DSV3_KIT_INTERPRET_ALL=1 (or
    ``TRITON_INTERPRET=1 dsv3 conformance --backend NAME --quick``) runs everything."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    backend = registry.discover().get(name)
    if backend is None or backend.unusable_reason is not None:
        reason = "not installed" if backend is None else backend.unusable_reason
        pytest.skip(f"backend {name} is not usable here under TRITON_INTERPRET=1: {reason}")
    everything = os.environ.get("DSV3_KIT_INTERPRET_ALL", "") not in ("", "0")
    if everything:
        report = run_conformance(backend, quick=True)
    else:
        report = run_conformance(
            backend, quick=True, dtypes=(torch.float32,), case_filter=lambda case: not case.name.startswith("671B")
        )
    assert report.ok, "\n".join(report.failures())
    assert report.n_cases > 0


def _blocks(scale: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """Per-element scale by indexing (cpu_ref repeats instead)."""
    r = torch.arange(rows) // block
    c = torch.arange(cols) // block
    return scale[..., r[:, None], c[None, :]]


def _dequant(w: Weight, dtype: torch.dtype) -> torch.Tensor:
    if w.fmt == HP:
        return w.data.to(dtype)
    if w.fmt == FP8_BLOCK:
        return (w.data.float() * _blocks(w.scale.float(), w.out_features, w.in_features, w.block_size)).to(dtype)
    return (w.data.float() * w.scale.float()[..., :, None]).to(dtype)


def _fp8_dynamic(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """Kernel-style: per 128-channel block, e4m3 x e4m3 products, scaled partial sums added in float32."""
    fp8 = w.data.dtype
    fmax = FP8_MAX[fp8]
    shape, k, b = x.shape, x.shape[-1], w.block_size
    x2 = x.reshape(-1, k).float()
    acc = torch.zeros(x2.shape[0], w.out_features)
    w_scale = _blocks(w.scale.float(), w.out_features, w.scale.shape[-1] * b, b)[:, ::b]  # (out, K/b)
    for j, start in enumerate(range(0, k, b)):
        xb = x2[:, start : start + b]
        # x * 0 is NaN for NaN and +-inf: a group holding either gets a NaN scale (dsv3.weights, non-finite rule)
        s = (xb.abs().amax(-1, keepdim=True) + (xb * 0).sum(-1, keepdim=True)).clamp(min=AMAX_FLOOR) / fmax
        if w.scale_fmt == "ue8m0":
            s = torch.exp2(torch.ceil(torch.log2(s)))
        q = (xb * (1.0 / s)).clamp(-fmax, fmax).to(fp8)  # a reciprocal multiply, not cpu_ref's division
        part = q.float() @ w.data[:, start : start + b].float().t()
        acc += part * s * w_scale[:, j][None, :]
    return acc.to(x.dtype).reshape(*shape[:-1], w.out_features)


def _int8_dynamic(x: torch.Tensor, w: Weight) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).float()
    s = (x2.abs().amax(-1, keepdim=True) + (x2 * 0).sum(-1, keepdim=True)).clamp(min=AMAX_FLOOR) / 127.0
    q = torch.round(x2 * (1.0 / s)).nan_to_num(0.0).clamp(-127, 127).long()  # int8 stores a NaN row as 0
    acc = q @ w.data.long().t()  # exact integers
    return (acc.float() * s * w.scale.float()[None, :]).to(x.dtype).reshape(*shape[:-1], w.out_features)


def _linear_for(request: OpRequest):
    if request.act_quant == "dynamic" and request.fmt == FP8_BLOCK:
        return _fp8_dynamic
    if request.act_quant == "dynamic" and request.fmt == INT8_W8A8:
        return _int8_dynamic
    return lambda x, w: torch.einsum("...i,oi->...o", x, _dequant(w, x.dtype))


def _rotary(x, cos, sin):
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * torch.complex(cos, sin).unsqueeze(2)).flatten(-2).to(x.dtype)


def _online_attention(q, k, v, q_pos, scale, chunk=3):
    """Flash-style: keys in chunks, a running max and sum, all in float32."""
    b, t, h, _ = q.shape
    qf = q.float().transpose(1, 2)  # (B, H, T, D)
    m = torch.full((b, h, t, 1), -torch.inf)
    denom = torch.zeros(b, h, t, 1)
    acc = torch.zeros(b, h, t, v.shape[-1])
    for start in range(0, k.shape[1], chunk):
        kc = k[:, start : start + chunk].float().transpose(1, 2)
        vc = v[:, start : start + chunk].float().transpose(1, 2)
        s = (qf @ kc.transpose(-1, -2)) * scale  # (B, H, T, c)
        keys = torch.arange(start, start + kc.shape[2])
        s = s.masked_fill(keys[None, None, None, :] > q_pos[:, None, :, None], -torch.inf)
        m_new = torch.maximum(m, s.amax(-1, keepdim=True))
        alive = torch.isfinite(m_new)
        corr = torch.where(alive, torch.exp(m - m_new), torch.zeros_like(m))
        p = torch.where(alive, torch.exp(s - m_new), torch.zeros_like(s))
        denom = denom * corr + p.sum(-1, keepdim=True)
        acc = acc * corr + p @ vc
        m = m_new
    return (acc / denom).transpose(1, 2).to(q.dtype)


def _latent_attention(q_latent, q_pe, kv, pe, q_pos, scale):
    q = torch.cat([q_latent, q_pe], -1)
    k = torch.cat([kv, pe], -1).unsqueeze(2).expand(-1, -1, q.shape[2], -1)
    v = kv.unsqueeze(2).expand(-1, -1, q.shape[2], -1)
    return _online_attention(q, k, v, q_pos, scale, chunk=5)


def _paged_cache_write(cache, kv, pe, slot_mapping):
    """One token at a time, latent and roped key stored separately."""
    page_size, c = cache.shape[1], kv.shape[-1]
    for n, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            cache[slot // page_size, slot % page_size, :c] = kv[n]
            cache[slot // page_size, slot % page_size, c:] = pe[n]


def _paged_attention(q_latent, q_pe, cache, block_table, seq_lens, scale):
    """Per row, page by page straight from the cache (no gather), an online softmax over the pages."""
    b, t, h, c = q_latent.shape
    page_size = cache.shape[1]
    out = torch.empty(b, t, h, c)
    for row in range(b):
        n = int(seq_lens[row])
        q_pos = torch.arange(n - t, n)  # (T,)
        ql, qp = q_latent[row].float(), q_pe[row].float()  # (T, H, C), (T, H, R)
        m, denom, acc = torch.full((t, h, 1), -torch.inf), torch.zeros(t, h, 1), torch.zeros(t, h, c)
        for i in range(-(-n // page_size)):
            entries = cache[int(block_table[row, i]), : min(page_size, n - i * page_size)].float()  # valid only
            kv, pe = entries[:, :c], entries[:, c:]
            s = (torch.einsum("thc,kc->thk", ql, kv) + torch.einsum("thr,kr->thk", qp, pe)) * scale
            keys = torch.arange(i * page_size, i * page_size + entries.shape[0])
            s = s.masked_fill(keys[None, None, :] > q_pos[:, None, None], -torch.inf)
            m_new = torch.maximum(m, s.amax(-1, keepdim=True))
            alive = torch.isfinite(m_new)
            corr = torch.where(alive, torch.exp(m - m_new), torch.zeros_like(m))
            p = torch.where(alive, torch.exp(s - m_new), torch.zeros_like(s))
            denom, acc, m = denom * corr + p.sum(-1, keepdim=True), acc * corr + p @ kv, m_new
        out[row] = acc / denom
    return out.to(q_latent.dtype)


def _moe_gate(x, gate_weight, bias, r):
    weights, ids = moe.moe_gate(x, gate_weight, bias, r)
    order = ids.argsort(-1, descending=True)  # same experts, another order
    return weights.gather(-1, order), ids.gather(-1, order)


def _experts_for(request: OpRequest):
    linear = _linear_for(request)

    def one(w: Weight, e: int) -> Weight:
        return Weight(w.data[e], w.fmt, None if w.scale is None else w.scale[e], w.block_size, w.scale_fmt)

    def experts(x, weights, ids, w1, w3, w2, expert_offset=0):
        out = torch.zeros(x.shape, dtype=torch.float32)
        xf = x.float()  # float32 intermediates throughout (a fused kernel's choice)
        for n in range(x.shape[0]):
            for slot in range(ids.shape[1]):
                e = int(ids[n, slot]) - expert_offset
                if not 0 <= e < w1.data.shape[0]:
                    continue
                xn = xf[n : n + 1]
                h = F.silu(linear(xn, one(w1, e))) * linear(xn, one(w3, e))
                out[n] += weights[n, slot] * linear(h, one(w2, e))[0]
        return out.to(x.dtype)

    return experts


def _sample(logits, temperature, top_p, generator):
    """Exponential race: argmax(p / E) with E ~ Exp(1) draws a token with probability p."""
    greedy = logits.argmax(-1)
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))[:, None]
    probs = torch.softmax(logits.float() / t, -1)
    sp, order = probs.sort(-1, descending=True)
    sp = sp.masked_fill(sp.cumsum(-1) - sp >= top_p[:, None], 0.0)
    keep = torch.zeros_like(probs).scatter(-1, order, sp)
    race = torch.empty_like(probs).exponential_(generator=generator)
    return torch.where(temperature > 0, (keep / race).argmax(-1), greedy)


class Independent:
    """Every operator, implemented a second way."""

    @hookimpl
    def dsv3_backend_info(self):
        return BackendInfo(
            name="independent",
            description="second implementation of every op",
            contract_version=CONTRACT_VERSION,
            formats=FORMATS,
        )

    @hookimpl
    def dsv3_op_embedding(self, request):
        return lambda ids, w: w.index_select(0, ids.reshape(-1)).view(*ids.shape, w.shape[-1])

    @hookimpl
    def dsv3_op_rms_norm(self, request):
        def rms(x, w, eps):
            xf = x.float()
            return (xf / torch.sqrt(xf.square().sum(-1, keepdim=True) / x.shape[-1] + eps) * w.float()).to(x.dtype)

        return rms

    @hookimpl
    def dsv3_op_rotary(self, request):
        return _rotary

    @hookimpl
    def dsv3_op_attention(self, request):
        return _online_attention

    @hookimpl
    def dsv3_op_mla_latent_attention(self, request):
        return _latent_attention

    @hookimpl
    def dsv3_op_paged_cache_write(self, request):
        return _paged_cache_write

    @hookimpl
    def dsv3_op_mla_paged_attention(self, request):
        return _paged_attention

    @hookimpl
    def dsv3_op_linear(self, request):
        return _linear_for(request)

    @hookimpl
    def dsv3_op_dequantize(self, request):
        return _dequant

    @hookimpl
    def dsv3_op_moe_gate(self, request):
        return _moe_gate

    @hookimpl
    def dsv3_op_moe_experts(self, request):
        return _experts_for(request)

    @hookimpl
    def dsv3_op_silu_and_mul(self, request):
        return lambda g, u: (g.float() * torch.sigmoid(g.float()) * u.float()).to(g.dtype)

    @hookimpl
    def dsv3_op_sample(self, request):
        return _sample


def test_an_independent_correct_backend_passes():
    report = run_conformance(Independent(), quick=True)
    assert report.ok, "\n".join(report.failures())
    assert {row.op for row in report.rows} == set(registry.OP_NAMES)
    assert report.fallbacks == []
    # it is not cpu_ref in disguise: its numbers differ, within tolerance
    assert any(row.max_abs > 0 for row in report.rows if row.op == "linear" and "dynamic" in row.label)


# ---------------------------------------------------------------------------------------- planted errors
def test_wrong_rmsnorm_epsilon_is_caught():
    bad = planted("bad_eps", "rms_norm", lambda r: lambda x, w, eps: basic.rms_norm(x, w, 1e-5))
    report = run_conformance(bad, quick=True)
    assert not report.ok
    assert report.failed_ops() == {"rms_norm"}
    failed_cases = [f.split(":")[0] for fs in failures_of(report).values() for f in fs]
    assert "small-x" in failed_cases and "eps=0.5" in failed_cases
    assert "rms_norm[-]" in report.format_table().split("failures:")[1]


def test_transposed_fp8_scale_is_caught():
    def transposed(x, w):
        scale = w.scale.transpose(-1, -2)
        full = scale.repeat_interleave(w.block_size, -2).repeat_interleave(w.block_size, -1)
        return F.linear(x, (w.data.float() * full[: w.out_features, : w.in_features]).to(x.dtype))

    bad = planted("bad_scale", "linear", lambda r: transposed if r.fmt == FP8_BLOCK and r.act_quant == "none" else None)
    report = run_conformance(bad, quick=True)
    assert report.failed_ops() == {"linear"}
    fails = failures_of(report)
    assert set(fails) == {"linear[fp8_block/none] float32", "linear[fp8_block/none] bfloat16"}
    square = [f for f in fails["linear[fp8_block/none] float32"] if f.startswith("square-grid")]
    assert square and "exceeds" in square[0]  # a square grid runs, and its numbers are wrong
    assert any("raised" in f for f in fails["linear[fp8_block/none] float32"])  # other grids do not even fit
    assert "linear[hp/none]" in report.fallbacks


def _old_act_quant_fp8(x, block, fp8, scale_fmt):
    """The quantizer before issue 24: NaN dropped by the max (as a GPU's max.f32 and the interpreter's nanmax)
    and by the clamp (fmax/fmin), so a NaN became -448 with a finite scale; UE8M0 made inf scales 1.0."""
    m, k = x.shape
    xf = F.pad(x.float(), (0, (-k) % block)).view(m, -1, block)
    s = xf.abs().nan_to_num(nan=0.0).amax(-1).clamp(min=AMAX_FLOOR) / FP8_MAX[fp8]
    if scale_fmt == "ue8m0":
        mantissa, exponent = torch.frexp(s)
        s = torch.ldexp(torch.ones_like(s), torch.where(mantissa == 0.5, exponent - 1, exponent))  # inf -> 1.0
    y = (xf / s.unsqueeze(-1)).nan_to_num(nan=-FP8_MAX[fp8]).clamp(-FP8_MAX[fp8], FP8_MAX[fp8])
    return y.to(fp8).view(m, -1)[:, :k], s


def test_old_nonfinite_act_quant_is_caught(monkeypatch):
    """Issue 24: the Triton act_quant_fp8 turned NaN (and inf over an inf scale) into -448. Planted as
    cpu_ref's linear with that quantizer: only the non-finite cases fail, and they do."""
    from dsv3.backends.cpu_ref import quant

    def old_linear(x, w):
        with monkeypatch.context() as mp:
            mp.setattr(quant, "quantize_act_fp8", _old_act_quant_fp8)
            return quant.linear_fp8_dynamic(x, w)

    bad = planted(
        "nan_to_448", "linear", lambda r: old_linear if r.fmt == FP8_BLOCK and r.act_quant == "dynamic" else None
    )
    report = run_conformance(bad, quick=True)
    assert report.failed_ops() == {"linear"}
    fails = failures_of(report)
    assert set(fails) == {"linear[fp8_block/dynamic] float32", "linear[fp8_block/dynamic] bfloat16"}
    for msgs in fails.values():
        assert sorted(f.split(":")[0] for f in msgs) == ["nonfinite-x", "ue8m0-nonfinite"]
        assert all("NaN mismatch" in f and "expected nan" in f for f in msgs)


def test_ue8m0_rounding_an_inf_scale_to_one_is_caught(monkeypatch):
    """Issue 24: cpu_ref's UE8M0 rounding turned an inf scale into 1.0 (the inf then clamped to 448)."""
    from dsv3.backends.cpu_ref import quant

    def old_round(scale):
        mantissa, exponent = torch.frexp(scale)
        return torch.ldexp(torch.ones_like(scale), torch.where(mantissa == 0.5, exponent - 1, exponent))

    def old_quant(x, block, fp8, scale_fmt):  # the old amax (inf for an inf group) with the old rounding
        m, k = x.shape
        xf = F.pad(x.float(), (0, (-k) % block)).view(m, -1, block)
        s = xf.abs().amax(-1).clamp(min=AMAX_FLOOR) / FP8_MAX[fp8]
        s = old_round(s) if scale_fmt == "ue8m0" else s
        return (xf / s.unsqueeze(-1)).clamp(-FP8_MAX[fp8], FP8_MAX[fp8]).to(fp8).view(m, -1)[:, :k], s

    def old_linear(x, w):
        with monkeypatch.context() as mp:
            mp.setattr(quant, "quantize_act_fp8", old_quant)
            return quant.linear_fp8_dynamic(x, w)

    bad = planted(
        "ue8m0_inf_to_1", "linear", lambda r: old_linear if r.fmt == FP8_BLOCK and r.act_quant == "dynamic" else None
    )
    report = run_conformance(bad, quick=True, dtypes=(torch.float32,))
    fails = failures_of(report)
    assert list(fails) == ["linear[fp8_block/dynamic] float32"]
    (msg,) = fails["linear[fp8_block/dynamic] float32"]
    # row 1 holds a +inf: the old rounding gave its group scale 1.0 and the row a finite output
    assert msg.startswith("ue8m0-nonfinite: NaN mismatch at (1, ") and "expected nan" in msg


def test_dropped_routing_bias_is_caught():
    bad = planted("no_bias", "moe_gate", lambda r: lambda x, gw, bias, routing: moe.moe_gate(x, gw, None, routing))
    report = run_conformance(bad, quick=True)
    assert report.failed_ops() == {"moe_gate"}
    msgs = [f for fs in failures_of(report).values() for f in fs]
    assert any(f.startswith("671B:") and "chose different experts" in f for f in msgs)
    assert not any(f.startswith(("tiny:", "236B:", "16B:")) for f in msgs)  # the bias-free cases still pass


def test_wrong_output_dtype_is_caught():
    bad = planted("fp32_out", "silu_and_mul", lambda r: lambda g, u: F.silu(g.float()) * u.float())
    report = run_conformance(bad, quick=True)
    rows = {r.dtype: r for r in report.rows}
    assert rows["float32"].ok
    assert not rows["bfloat16"].ok
    assert all("dtype torch.float32, expected torch.bfloat16" in f for f in rows["bfloat16"].failures)


@pytest.mark.parametrize(
    "op, impl, expected",
    [
        ("rotary", lambda x, c, s: basic.rotary(x, c, s)[..., :-2], "has shape"),
        ("embedding", lambda ids, w: basic.embedding(ids, w).to("meta"), "on device meta"),
        ("sample", lambda logits, t, p, g: (_ for _ in ()).throw(RuntimeError("kernel launch failed")), "raised"),
        ("rotary", lambda x, c, s: x.copy_(basic.rotary(x, c, s)), "in place"),
    ],
)
def test_shape_device_raise_and_in_place_are_caught(op, impl, expected):
    report = run_conformance(planted(f"bad_{op}", op, lambda r: impl), quick=True)
    assert report.failed_ops() == {op}
    assert all(expected in f for f in report.failures()), report.failures()[:3]


def _writes_slot_minus_one(cache, kv, pe, slot_mapping):
    """Forgets that a negative slot means padding: slot -1 lands on the cache's last entry."""
    cache.view(-1, cache.shape[-1])[slot_mapping] = torch.cat([kv, pe], -1)


def _reads_whole_pages(q_latent, q_pe, cache, block_table, seq_lens, scale):
    """Takes a row's length as its pages' whole size: reads the stale rest of its last page."""
    page_size = cache.shape[1]
    whole = (seq_lens + page_size - 1) // page_size * page_size
    return paged.mla_paged_attention(q_latent, q_pe, cache, block_table, whole.to(seq_lens.dtype), scale)


def _not_causal(q_latent, q_pe, cache, block_table, seq_lens, scale):
    """Every query sees the whole row, as a decode step's would: wrong for T > 1."""
    outs = []
    for i in range(q_latent.shape[1]):
        one = q_latent[:, i : i + 1], q_pe[:, i : i + 1]
        outs.append(paged.mla_paged_attention(*one, cache, block_table, seq_lens, scale))
    return torch.cat(outs, 1)


@pytest.mark.parametrize(
    "op, impl, caught",
    [
        ("paged_cache_write", _writes_slot_minus_one, {"scattered", "all-padding"}),
        ("mla_paged_attention", _reads_whole_pages, {"random-pages", "shared-pages", "page-boundary"}),
        ("mla_paged_attention", _not_causal, {"causal-prefill", "causal-chunk", "page-size-1", "ties"}),
    ],
)
def test_paged_cache_errors_are_caught(op, impl, caught):
    report = run_conformance(planted(f"bad_{op}", op, lambda r: impl), quick=True, ops=(op,))
    assert report.failed_ops() == {op}
    failed = {f.split(":")[0] for fs in failures_of(report).values() for f in fs}
    assert caught <= failed, failed


def _returns_cache(cache, kv, pe, slots):
    paged.paged_cache_write(cache, kv, pe, slots)
    return cache


def _scales_its_input(cache, kv, pe, slots):
    paged.paged_cache_write(cache, kv.mul_(1.0 + 2**-4), pe, slots)


def _writes_nothing(cache, kv, pe, slots):
    return None


@pytest.mark.parametrize(
    "impl, expected",
    [(_returns_cache, "expected None"), (_scales_its_input, "argument 1 (kv)"), (_writes_nothing, "not bit-for-bit")],
)
def test_an_in_place_operator_must_write_its_cache_return_none_and_keep_its_other_inputs(impl, expected):
    report = run_conformance(planted("bad_write", "paged_cache_write", lambda r: impl), quick=True)
    assert report.failed_ops() == {"paged_cache_write"}
    fails = [f for f in report.failures() if "all-padding" not in f]  # nothing to write: _writes_nothing passes it
    assert fails and all(expected in f for f in fails), fails


def test_routing_comparison_ignores_order_but_not_weights():
    ok = planted("reordered", "moe_gate", lambda r: _moe_gate)
    assert run_conformance(ok, quick=True).ok

    def halved(x, gw, bias, routing):
        weights, ids = _moe_gate(x, gw, bias, routing)
        return weights * torch.linspace(1.0, 0.5, weights.shape[1]), ids

    report = run_conformance(planted("reweighted", "moe_gate", lambda r: halved), quick=True)
    assert report.failed_ops() == {"moe_gate"}
    assert any("routing weights" in f for f in report.failures())


def test_a_biased_sampler_is_caught():
    def too_hot(logits, temperature, top_p, generator):
        return basic.sample(logits, temperature * 1.5, torch.ones_like(top_p), generator)

    report = run_conformance(planted("too_hot", "sample", lambda r: too_hot), quick=True)
    assert report.failed_ops() == {"sample"}
    assert any("nucleus" in f or "standard deviations" in f for f in report.failures())


def test_a_wrong_prepare_weight_is_caught():
    def to_fnuz_forgetting_the_scale(w: Weight) -> Weight | None:
        if w.fmt != FP8_BLOCK:
            return None
        bits = w.data.view(torch.uint8).clone()
        bits[bits == 0x80] = 0  # e4m3fn -0.0 is NaN in e4m3fnuz
        return Weight(bits.view(torch.float8_e4m3fnuz), w.fmt, w.scale, w.block_size, w.scale_fmt)  # scale not x2

    class Plugin:
        @hookimpl
        def dsv3_backend_info(self):
            return BackendInfo(
                name="mi300ish",
                description="prepare only",
                contract_version=CONTRACT_VERSION,
                prepare_weight=to_fnuz_forgetting_the_scale,
            )

    report = run_conformance(registry.make_backend(Plugin(), "mi300ish"), quick=True)
    assert report.failed_ops() == {"prepare_weight"}
    assert [r.label for r in report.rows] == ["fp8_block"] and report.rows[0].failed == 2


def test_a_backend_that_declines_everything_reports_only_fallbacks():
    report = run_conformance(planted("lazy", "rms_norm", lambda r: None), quick=True)
    assert report.ok and report.rows == []
    assert "rms_norm" in report.fallbacks and "linear" in report.fallbacks


# ---------------------------------------------------------------------------------------- the command and pytest
def test_cli_says_nothing_was_checked_and_exits_1_unless_allowed(tmp_path, capsys, monkeypatch):
    """Before: ``PASS: 0 cases`` and exit 0 for a backend that implements no operator."""
    found = registry.discover()
    lazy = planted("lazy", "rms_norm", lambda r: None)
    monkeypatch.setattr(registry, "discover", lambda: {**found, "lazy": lazy})
    out = tmp_path / "report.json"
    assert cli_main(["conformance", "--backend", "lazy", "--quick", "--json", str(out)]) == 1
    captured = capsys.readouterr()
    assert "NOTHING CHECKED: 0 cases" in captured.out and "PASS" not in captured.out
    assert captured.err.strip().splitlines() == [
        "dsv3: nothing was checked: backend lazy implements none of the operators asked for itself "
        "(pass --allow-empty to accept that)"
    ]
    data = json.loads(out.read_text())
    assert data["checked_nothing"] and data["cases"] == 0
    assert cli_main(["conformance", "--backend", "lazy", "--quick", "--allow-empty"]) == 0
    assert capsys.readouterr().err == ""
    # a backend that implements what was asked for is unaffected
    assert cli_main(["conformance", "--backend", "cpu_ref", "--quick", "--op", "rms_norm", "--dtype", "float32"]) == 0
    assert "PASS" in capsys.readouterr().out


def test_cli_writes_json_and_exits_nonzero_only_on_failure(tmp_path, capsys):
    out = tmp_path / "report.json"
    rc = cli_main(["conformance", "--backend", "cpu_ref", "--quick", "--op", "rms_norm", "--json", str(out)])
    assert rc == 0
    data = json.loads(out.read_text())
    assert data["ok"] and {r["op"] for r in data["rows"]} == {"rms_norm"}
    assert data["tolerances"]["bfloat16"]["rtol"] > 0
    assert "rms_norm" in capsys.readouterr().out

    assert cli_main(["conformance", "--backend", "nvidia"]) == 2  # unusable: one line, exit 2
    assert "not usable" in capsys.readouterr().err
    assert (
        cli_main(
            [
                "conformance",
                "--backend",
                "cpu_ref",
                "--json",
                str(tmp_path / "no" / "r.json"),
                "--op",
                "rotary",
                "--quick",
            ]
        )
        == 2
    )


def test_pytest_plugin_runs_the_kit(tmp_path):
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-p",
        "dsv3.conformance.pytest_plugin",
        "--pyargs",
        "dsv3.conformance",
        "--dsv3-backend",
        "cpu_ref",
        "--dsv3-quick",
        "--dsv3-dtype",
        "float32",
        "-q",
        "-p",
        "no:cacheprovider",
        "-k",
        "rms_norm or resolve",
    ]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "11 passed" in run.stdout  # 10 rms_norm cases + the resolution test

    bad = subprocess.run(
        cmd[:8] + ["nvidia"] + cmd[9:], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert bad.returncode != 0
    assert "not usable" in bad.stdout + bad.stderr
