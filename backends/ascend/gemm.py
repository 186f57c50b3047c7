"""Linear layers: high precision through torch's own matmul, INT8 W8A8 through torch_npu.

W8A8 with dynamic per-token activation quantization, the DeepSeek-V3 recipe on 910B:
``torch_npu.npu_dynamic_quant(x) -> (q int8, s fp32 per row)`` with ``s = rowmax(|x|) / 127``,
``q = round(x / s)``; then ``torch_npu.npu_quant_matmul(x1=q, x2=W^T (in, out) int8, scale=w_scale
(out,) fp32, pertoken_scale=s (M,) fp32, output_dtype=x.dtype)`` = ``(q @ W^T) * w_scale * s``
(int32 accumulation). npu_quant_matmul's x2 may be the transposed view of the (out, in) weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.weights import Weight


def linear_hp(x: torch.Tensor, w: Weight) -> torch.Tensor:
    """x (..., in), w hp (out, in) -> (..., out): aten::linear, which torch_npu runs on the NPU's cube units."""
    return F.linear(x, w.data)


def linear_w8a8_with(tn):
    def linear_w8a8(x: torch.Tensor, w: Weight) -> torch.Tensor:
        """x (..., in) bf16/fp16, w int8_w8a8 (out, in) int8 + scale (out,) fp32 -> (..., out) x.dtype."""
        shape = x.shape
        q, s = tn.npu_dynamic_quant(x.reshape(-1, shape[-1]))  # (M, in) int8, (M,) fp32
        y = tn.npu_quant_matmul(q, w.data.t(), w.scale, pertoken_scale=s, output_dtype=x.dtype)  # (M, out)
        return y.reshape(*shape[:-1], w.out_features)

    return linear_w8a8
