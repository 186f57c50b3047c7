"""How close a backend's result must be to cpu_ref's, per numeric format, and why.

One criterion everywhere: an element passes when ``|out - ref| <= rtol * (|ref| + rms)``, with
``rms`` the root mean square of ref's row (its last dimension: one token's output). The ``rms``
term measures error against the size of the token's whole output, so elements that cancel to near
zero (a dot product of random vectors) are not held to a relative bound they cannot meet; the
``|ref|`` term keeps large elements to a relative bound. ``rtol == 0`` means bit-for-bit.
Every tolerance of the kit has ``atol == 0``; tests that compare with cpu_ref through the same
function may add an absolute allowance (``Tolerance(name, rtol, why, atol=...)``: the element passes
when ``|out - ref| <= atol + rtol * (|ref| + rms)``; bit-for-bit only when both are 0).
The sizes were checked against a second, independent implementation of every operator
(tests/conformance/test_kit.py), on the quick and the full cases.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..weights import FP8_BLOCK, INT8_W8A8


@dataclass(frozen=True)
class Tolerance:
    """``rtol`` (and ``atol``) for the criterion above and the reason it is that size."""

    name: str
    rtol: float
    why: str
    atol: float = 0.0

    @property
    def exact(self) -> bool:
        """Bit for bit: no relative and no absolute allowance."""
        return self.rtol == 0 and self.atol == 0


EXACT = Tolerance(
    "exact", 0.0, "copies and integer results (row lookup, cache writes, expert ids, argmax): bit for bit"
)
FLOAT32 = Tolerance(
    "float32",
    1e-5,
    "24-bit mantissa (eps 6e-8); a different summation order over K <= 16384 terms moves a sum by "
    "~sqrt(K)*eps ~ 1e-5 of the tensor's scale at worst",
)
ATTENTION_FP32 = Tolerance(
    "float32 softmax",
    5e-5,
    "softmax turns an absolute error d in a score into a relative error d in its weight; a score is a sum "
    "of up to 576 products and reaches |s| ~ 30, so two summation orders differ by ~|s|*sqrt(K)*eps "
    "= 30 * 24 * 6e-8 ~ 4e-5",
)
BFLOAT16 = Tolerance(
    "bfloat16",
    2**-6,
    "8-bit mantissa: one rounding moves a value by <= 2^-8 of itself; implementations round intermediates "
    "(silu, the gate x up product, the output) at different points, so two correct ones may sit four such "
    "roundings apart: 4 x 2^-8 = 2^-6 = 1.6e-2",
)
FLOAT16 = Tolerance(
    "float16", 2**-9, "11-bit mantissa: one rounding is <= 2^-11; four roundings apart: 2^-9 = 2e-3 (as bfloat16)"
)
FP8_DYNAMIC_FP32 = Tolerance(
    "fp8 e4m3 dynamic, float32",
    1e-3,
    "activations are quantized with cpu_ref's own formula (s = amax/448 per token per 128 channels, "
    "round to nearest even), so the e4m3 codes agree except where x/s lies within an fp32 ulp of a "
    "rounding boundary (rare); e4m3 x e4m3 products are exact in fp32 and sums differ by fp32 order only",
)
DYNAMIC_LOW = Tolerance(
    "dynamic activations, 16-bit",
    6e-2,
    "a 16-bit input often lands exactly on a rounding midpoint of the e4m3 or int8 grid once scaled (its "
    "mantissa has 8 bits); a kernel that multiplies by the reciprocal scale, as DeepGEMM's quantizer does, "
    "rounds such codes the other way than cpu_ref's division. Each moves by one step (1/8 of the value for "
    "e4m3, 1/127 of the block max for int8); on the 671B shapes that moved single outputs by up to 3.3% "
    "(fp8) and 2.2% (int8) of their row's rms (measured, 3 of 1024 int8 codes flipped); twice that",
)
CHAINED_LOW = Tolerance(
    "16-bit, chained GEMMs",
    2**-5,
    "moe_experts chains three GEMMs and a silu: cpu_ref rounds the hidden state to the compute dtype after "
    "each step, a fused kernel may keep it in float32; measured up to ~2^-6 apart on random cases, so "
    "twice that (2^-5 = 3.1e-2)",
)
DYNAMIC_CHAINED_LOW = Tolerance(
    "dynamic activations, 16-bit, chained",
    0.1,
    "moe_experts also requantizes its hidden state before the down projection: where an implementation "
    "holds that state in float32 instead of bf16, a few percent of its codes move one step; measured up "
    "to 7.4% (fp8) and 4.8% (int8) of a token's rms, on the tiny (8 terms per sum) and 671B shapes alike",
)
INT8_DYNAMIC_FP32 = Tolerance(
    "int8 dynamic, float32",
    1e-4,
    "int8 x int8 products summed in int32 are exact; what remains is the fp32 rescaling (s_x * s_w) and "
    "rare off-by-one codes where x/s lies within an fp32 ulp of .5 (each moves the output by "
    "~1/(127*sqrt(K)) of its scale)",
)


def dtype_tolerance(dtype: torch.dtype) -> Tolerance:
    """The tolerance of arithmetic carried out in ``dtype``."""
    if dtype == torch.float32 or dtype == torch.float64:
        return FLOAT32
    if dtype == torch.float16:
        return FLOAT16
    return BFLOAT16


def tolerance_for(op: str, fmt: str, act_quant: str, dtype: torch.dtype) -> Tolerance:
    """The tolerance for one operator, weight format, activation mode and compute dtype."""
    if op in ("embedding", "paged_cache_write"):
        return EXACT  # copies: row lookups, cache stores
    if op in ("moe_gate", "sample"):
        return FLOAT32  # routing runs in float32 whatever the compute dtype (hookspec); ids are exact
    wide = dtype in (torch.float32, torch.float64)
    if op in ("attention", "mla_latent_attention", "mla_paged_attention") and wide:
        return ATTENTION_FP32
    if op in ("linear", "moe_experts") and act_quant == "dynamic" and fmt in (FP8_BLOCK, INT8_W8A8):
        if wide:
            return FP8_DYNAMIC_FP32 if fmt == FP8_BLOCK else INT8_DYNAMIC_FP32
        return DYNAMIC_CHAINED_LOW if op == "moe_experts" else DYNAMIC_LOW
    if op == "moe_experts" and not wide:
        return CHAINED_LOW
    return dtype_tolerance(dtype)


#: Every tolerance, for the docs and ``dsv3 conformance --explain``.
TOLERANCES: tuple[Tolerance, ...] = (
    EXACT,
    FLOAT32,
    ATTENTION_FP32,
    BFLOAT16,
    FLOAT16,
    FP8_DYNAMIC_FP32,
    INT8_DYNAMIC_FP32,
    CHAINED_LOW,
    DYNAMIC_LOW,
    DYNAMIC_CHAINED_LOW,
)
