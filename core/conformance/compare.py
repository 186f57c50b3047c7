"""Comparators: a backend's output against cpu_ref's, with the tolerance of its format.

Each returns an :class:`Outcome` (pass/fail, max and mean absolute error, the worst element's
error as a fraction of what it was allowed, and a one-line message naming what is wrong).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..weights import FP8_DTYPES
from .tolerances import Tolerance


@dataclass
class Outcome:
    """The result of one case. ``worst`` is max(err / allowed) over elements: <= 1 passes."""

    ok: bool
    max_abs: float = 0.0
    mean_abs: float = 0.0
    worst: float = 0.0
    message: str = ""


def fail(message: str) -> Outcome:
    return Outcome(False, math.nan, math.nan, math.inf, message)


def check_meta(out: object, ref: torch.Tensor, device_type: str, what: str = "output") -> str | None:
    """A message when ``out`` is not a tensor of ref's shape and dtype on the backend's device."""
    if not isinstance(out, torch.Tensor):
        return f"{what} is {type(out).__name__}, expected a torch.Tensor"
    if tuple(out.shape) != tuple(ref.shape):
        return f"{what} has shape {tuple(out.shape)}, expected {tuple(ref.shape)}"
    if out.dtype != ref.dtype:
        return f"{what} has dtype {out.dtype}, expected {ref.dtype}"
    if out.device.type != device_type:
        return f"{what} is on device {out.device}, expected the backend's device {device_type!r}"
    return None


def _index(flat_index: int, shape: tuple[int, ...]) -> tuple[int, ...]:
    idx = []
    for size in reversed(shape):
        idx.append(flat_index % max(size, 1))
        flat_index //= max(size, 1)
    return tuple(reversed(idx))


def compare_tensors(out: torch.Tensor, ref: torch.Tensor, tol: Tolerance) -> Outcome:
    """Elementwise ``|out - ref| <= atol + rtol * (|ref| + rms)``, rms taken over the last dimension (one
    token's row); NaN and inf must sit where ref has them.

    With ``rtol == atol == 0`` the tensors must be bit-for-bit equal (the sign of zero included; NaN
    where ref has NaN).
    """
    out = out.detach().to("cpu")
    if tol.exact and out.dtype == ref.dtype and out.dtype in FP8_DTYPES:  # an FP8 latent cache: bytes, not values
        o, r = out.view(torch.uint8), ref.view(torch.uint8)
        if torch.equal(o, r):
            return Outcome(True)
        where = int(torch.argmax((o != r).to(torch.uint8).flatten()).item())
        i = _index(where, tuple(ref.shape))
        got, want = o.flatten()[where].item(), r.flatten()[where].item()
        return Outcome(False, math.inf, math.inf, math.inf, f"byte {i} differs: got {got:#04x}, expected {want:#04x}")
    if tol.exact:
        if _equal_with_nans(out, ref):
            return Outcome(True)
        o, r = out.double(), ref.double()
        both_nan = o.isnan() & r.isnan()
        diff = (o - r).abs().nan_to_num(math.inf).masked_fill(both_nan, 0)
        where = int(torch.argmax(((diff > 0) | ((o.signbit() != r.signbit()) & ~both_nan)).to(torch.uint8)).item())
        i = _index(where, tuple(ref.shape))
        return Outcome(
            False,
            float(diff.max()),
            float(diff.mean()),
            math.inf,
            f"not bit-for-bit equal at {i}: got {o.flatten()[where].item()!r}, expected {r.flatten()[where].item()!r}",
        )
    o, r = out.double(), ref.double()
    r_nan, o_nan = torch.isnan(r), torch.isnan(o)
    if not torch.equal(r_nan, o_nan):
        where = int(torch.argmax((r_nan != o_nan).to(torch.uint8)).item())
        got, want = o.flatten()[where].item(), r.flatten()[where].item()
        return fail(f"NaN mismatch at {_index(where, tuple(ref.shape))}: got {got!r}, expected {want!r}")
    r_inf = torch.isinf(r)
    inf_bad = (torch.isinf(o) != r_inf) | (r_inf & (o != r))
    if bool(inf_bad.any()):
        where = int(torch.argmax(inf_bad.to(torch.uint8)).item())
        got, want = o.flatten()[where].item(), r.flatten()[where].item()
        return fail(f"inf mismatch at {_index(where, tuple(ref.shape))}: got {got!r}, expected {want!r}")
    finite = torch.isfinite(r)
    if not bool(finite.any()):
        return Outcome(True)
    # errors scale with each token's (row's) magnitude, not with the largest row's
    zeroed = torch.where(finite, r, torch.zeros_like(r))
    row_rms = zeroed.pow(2).mean(-1, keepdim=True).sqrt().expand_as(r) if r.dim() else zeroed.abs()
    rf, of, rms_f = r[finite], o[finite], row_rms[finite]
    diff = (of - rf).abs()
    allowed = tol.atol + tol.rtol * (rf.abs() + rms_f)
    ratio = torch.where(allowed > 0, diff / allowed.clamp(min=1e-300), torch.where(diff > 0, math.inf, 0.0))
    worst = float(ratio.max())
    max_abs, mean_abs = float(diff.max()), float(diff.mean())
    if worst <= 1.0:
        return Outcome(True, max_abs, mean_abs, worst)
    k = int(torch.argmax(ratio).item())
    where = _index(int(torch.nonzero(finite.flatten())[k].item()), tuple(ref.shape))
    return Outcome(
        False,
        max_abs,
        mean_abs,
        worst,
        f"error {diff[k].item():.3g} at {where} (got {of[k].item():.6g}, expected {rf[k].item():.6g}) exceeds "
        f"{tol.name} tolerance {allowed[k].item():.3g} = {_formula(tol, rms_f[k].item())}",
    )


def _equal_with_nans(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Equal values and signs of zero, NaN only where ref has NaN (a NaN payload is not compared)."""
    if out.dtype != ref.dtype or out.shape != ref.shape:
        return False
    if not ref.is_floating_point():
        return torch.equal(out, ref)
    nan = ref.isnan()
    if not torch.equal(out.isnan(), nan):
        return False
    o, r = out.masked_fill(nan, 0), ref.masked_fill(nan, 0)
    return torch.equal(o, r) and torch.equal(o.signbit(), r.signbit())


def _formula(tol: Tolerance, rms: float) -> str:
    relative = f"{tol.rtol:g} x (|ref| + row rms {rms:.3g})"
    if not tol.atol:
        return relative
    return f"{tol.atol:g}" + (f" + {relative}" if tol.rtol else " (absolute)")


def compare_routing(out: object, ref: tuple[torch.Tensor, torch.Tensor], tol: Tolerance, device_type: str) -> Outcome:
    """moe_gate: the same expert SET per token (order free) and the same weight per chosen expert."""
    if not isinstance(out, (tuple, list)) or len(out) != 2:
        return fail(f"returned {type(out).__name__}, expected a (weights, ids) pair")
    weights, ids = out
    ref_w, ref_ids = ref
    for got, want, what in ((weights, ref_w, "weights"), (ids, ref_ids, "ids")):
        msg = check_meta(got, want, device_type, what)
        if msg:
            return fail(msg)
    ids, weights = ids.to("cpu"), weights.to("cpu")
    got_ids, order = ids.sort(dim=-1)
    want_ids, ref_order = ref_ids.sort(dim=-1)
    differ = (got_ids != want_ids).any(dim=-1)
    if bool(differ.any()):
        row = int(torch.nonzero(differ)[0].item())
        return fail(
            f"chose different experts for {int(differ.sum())} of {ids.shape[0]} tokens; token {row}: "
            f"got {sorted(ids[row].tolist())}, expected {sorted(ref_ids[row].tolist())}"
        )
    got_w = weights.gather(-1, order)
    want_w = ref_w.gather(-1, ref_order)
    result = compare_tensors(got_w, want_w, tol)
    if not result.ok:
        result.message = "routing weights (matched by expert id): " + result.message
    return result


def _nucleus(logits: torch.Tensor, temperature: float, top_p: float, slack: float = 1e-5) -> torch.Tensor:
    """(V,) bool: tokens that may be sampled (the top-p set, with ``slack`` for float rounding at its edge)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    sorted_p, order = probs.sort(descending=True)
    before = sorted_p.cumsum(0) - sorted_p
    keep_sorted = (before < top_p + slack) & (sorted_p > 0)
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


def nucleus_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """(V,) float64: the distribution sampling should follow (softmax restricted to the exact nucleus)."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    keep = _nucleus(logits, temperature, top_p, slack=0.0)
    p = torch.where(keep, probs, torch.zeros_like(probs))
    return p / p.sum()


def check_sample(
    run,
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seed,
    device_type: str,
    distribution: bool,
) -> Outcome:
    """sample: greedy rows exact (any tied maximum), sampled rows inside the nucleus, the same seed
    gives the same tokens, and (``distribution``: every row has the same logits) the token
    frequencies match the nucleus distribution within 5 standard deviations.

    ``run(seed)`` calls the backend with a fresh generator seeded with ``seed`` (or None).
    """
    first = run(seed)
    ref = torch.empty(logits.shape[0], dtype=torch.int64)
    msg = check_meta(first, ref, device_type, "tokens")
    if msg:
        return fail(msg)
    tokens = first.to("cpu")
    if seed is not None and bool((temperature > 0).any()):
        again = run(seed).to("cpu")
        if not torch.equal(again, tokens):
            return fail(f"not deterministic: the same generator seed {seed} gave different tokens")
    v = logits.shape[1]
    if bool(((tokens < 0) | (tokens >= v)).any()):
        return fail(f"token ids outside [0, {v})")
    for row in range(logits.shape[0]):
        t, tok = float(temperature[row]), int(tokens[row])
        if t == 0:
            if logits[row, tok] != logits[row].max():
                return fail(
                    f"greedy row {row}: token {tok} (logit {logits[row, tok].item():.6g}) is not an argmax "
                    f"(max {logits[row].max().item():.6g})"
                )
        elif not bool(_nucleus(logits[row], t, float(top_p[row]))[tok]):
            return fail(f"row {row}: sampled token {tok} lies outside the top-p {float(top_p[row]):g} nucleus")
    if not distribution:
        return Outcome(True)
    n = logits.shape[0]
    want = nucleus_distribution(logits[0], float(temperature[0]), float(top_p[0]))
    freq = torch.bincount(tokens, minlength=v).double() / n
    err = (freq - want).abs()
    allowed = 5 * (want * (1 - want) / n).sqrt() + 2.0 / n
    worst = float((err / allowed).max())
    out = Outcome(worst <= 1.0, float(err.max()), float(err.mean()), worst)
    if not out.ok:
        k = int(torch.argmax(err / allowed))
        out.message = (
            f"token {k} drawn with frequency {freq[k].item():.4f} over {n} rows, expected "
            f"{want[k].item():.4f} (more than 5 standard deviations away)"
        )
    return out
