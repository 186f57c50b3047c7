"""The flash-style ``attention`` kernel (naive MLA form, the GPU prefill path) against cpu_ref.

Runs on CPU through Triton's interpreter, set up as in ``test_triton_kernels`` (whose TOL and
assert_close are reused). Every case runs twice: with the wrapper's own tiling (under the
interpreter one large tile) and with 16 x 16 tiles, which exercise the online softmax across key
tiles, several query tiles per (row, head), rows past T in the last tile and the causal bound.

Cache entries past every query's position are NaN in the kernel's input (they must not be read)
and 1e3 in cpu_ref's (whose einsum reads them with probability 0).

Tolerances (max |got - want| / max |want|): fp32 1e-5, the same fp32 products summed in another
order, with exp2 of prescaled scores instead of exp (a few 2^-24 relative); bf16 1e-2, both sides
round the float32 result once to bfloat16 (2^-8 relative spacing).
"""

from __future__ import annotations

import sys

import pytest
import torch

from dsv3.backends.cpu_ref import attention as ref_attention
from dsv3.backends.triton_kernels import ops
from dsv3.backends.triton_kernels.runtime import INTERPRET_ENV, KernelArgumentError
from dsv3.backends.triton_kernels.target import AMD
from dsv3.hookspecs import OpRequest
from tests.backends.test_triton_kernels import BF16, F32, TOL, assert_close, rand

pytest.importorskip("triton", reason="the Triton kernels need triton (pip install triton)")

SCALE = 0.3


@pytest.fixture(scope="module", autouse=True)
def kernel():
    """The attention kernel module, imported (or already imported) under TRITON_INTERPRET=1."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(INTERPRET_ENV, "1")
        mod = sys.modules.get("dsv3.backends.triton_kernels.attention")
        if mod is not None and type(mod._attention_kernel).__name__ != "InterpretedFunction":
            pytest.skip("the Triton kernels were already compiled for a GPU in this process")
        yield ops._k().attention


def arange_rows(*starts_and_lengths: tuple[int, int]) -> torch.Tensor:
    return torch.stack([torch.arange(s, s + n) for s, n in starts_and_lengths])


# name: (B, S, H, Dqk, Dv, q_pos (B, T), score multiplier)
CASES = {
    "one-token": (1, 1, 1, 24, 16, torch.tensor([[0]]), 1.0),
    "decode": (1, 37, 3, 48, 32, torch.tensor([[36]]), 1.0),
    "decode-rows-apart": (2, 37, 3, 24, 16, torch.tensor([[36], [10]]), 1.0),
    "prefill": (2, 45, 3, 48, 32, torch.arange(45).expand(2, 45), 1.0),  # one row broadcast: stride 0
    # row 0 from the start, row 1 a chunk at 5..10 onto a cache, row 2 shorter (its last position repeated)
    "batch": (3, 20, 3, 24, 16, torch.tensor([[0, 1, 2, 3, 4, 5], [5, 6, 7, 8, 9, 10], [0, 1, 2, 2, 2, 2]]), 1.0),
    "chunk-past-tiles": (1, 50, 2, 24, 16, arange_rows((17, 20)), 1.0),
    "v3-head-dims": (1, 9, 2, 192, 128, arange_rows((4, 5)), 1.0),
    "large-scores": (1, 4, 2, 48, 32, arange_rows((0, 4)), 8.0),  # scores ~ +-100: the max must be subtracted
}


def make_case(name: str, dtype: torch.dtype):
    """(q, k, v, q_pos) for the kernel, (k, v) for cpu_ref; k is a view into a longer cache, v a split."""
    b, s, h, dqk, dv, q_pos, mult = CASES[name]
    t = q_pos.shape[1]
    q = rand(b, t, h, dqk, seed=1) * mult
    k = rand(b, s + 3, h, dqk, seed=2)[:, :s] * mult
    v = rand(b, s, h, dv + 5, seed=3)[..., 5:]
    k_ref, v_ref = k.clone(), v.clone()
    for row in range(b):
        last = int(q_pos[row].max())
        k[row, last + 1 :], v[row, last + 1 :] = float("nan"), float("nan")
        k_ref[row, last + 1 :], v_ref[row, last + 1 :] = 1e3, 1e3
    cast = [x.to(dtype) for x in (q, k, v, k_ref, v_ref)]
    return cast[0], cast[1], cast[2], q_pos, cast[3], cast[4]


@pytest.mark.parametrize("blocks", [None, (16, 16)], ids=["default-tiles", "tiles16"])
@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", list(CASES))
def test_attention_matches_cpu_ref(kernel, name, dtype, blocks):
    q, k, v, q_pos, k_ref, v_ref = make_case(name, dtype)
    want = ref_attention.attention(q, k_ref, v_ref, q_pos, SCALE)
    assert torch.isfinite(want).all()
    got = kernel.attention(q, k, v, q_pos, SCALE, blocks=blocks)
    assert torch.isfinite(got).all(), f"{name}: cache entries past every position were read"
    assert_close(got, want, TOL[dtype], f"attention {name} blocks={blocks}")


def test_operator_is_served_by_the_kernel(kernel):
    fn = ops.build_attention(OpRequest(dtype=F32), AMD)
    assert fn is ops.attention
    q, k, v, q_pos, k_ref, v_ref = make_case("batch", F32)
    assert_close(fn(q, k, v, q_pos.to(torch.int32), SCALE), ref_attention.attention(q, k_ref, v_ref, q_pos, SCALE),
                 TOL[F32], "ops.attention, int32 positions")  # fmt: skip


def test_wrapper_rejects_bad_arguments_with_one_clear_line(kernel):
    q, k, v, q_pos = rand(1, 2, 3, 24), rand(1, 5, 3, 24), rand(1, 5, 3, 16), torch.zeros(1, 2, dtype=torch.int64)
    cases = [
        ((q, k.to(BF16), v, q_pos), "attention: k must have dtype in (float32), got bfloat16"),
        ((q.double(), k.double(), v.double(), q_pos), "attention: q must have dtype in (float32, bfloat16, float16)"),
        ((q[0], k, v, q_pos), "attention: q must have 4 dims, got shape [2, 3, 24]"),
        ((q, k[:, :, :2], v, q_pos), "attention: k must have shape [1, 5, 3, 24], got [1, 5, 2, 24]"),
        ((q, k, v[:, :4], q_pos), "attention: v must have shape [1, 5, 3, 16], got [1, 4, 3, 16]"),
        ((q, k, v, q_pos.float()), "attention: q_pos must have dtype in (int64, int32), got float32"),
        ((q, k, v, q_pos[:, :1]), "attention: q_pos must have shape [1, 2], got [1, 1]"),
        ((q, k[:, :0], v[:, :0], q_pos), "attention: there are no keys (S = 0)"),
        ((q, k.to("meta"), v, q_pos), "attention: tensors on different devices"),
        (
            tuple(x.to("meta") for x in (q, k, v, q_pos)),
            "attention: with TRITON_INTERPRET=1 tensors must be on the cpu",
        ),
    ]
    for args, message in cases:
        with pytest.raises(KernelArgumentError) as info:
            kernel.attention(*args, SCALE)
        assert message in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(KernelArgumentError, match="blocks must be two powers of two >= 16, got \\(8, 16\\)"):
        kernel.attention(q, k, v, q_pos, SCALE, blocks=(8, 16))
