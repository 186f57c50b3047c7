"""Load-time conversion of FP8 checkpoints to what a 910B-class NPU computes with (no FP8 there).

Called by the loader once per ``(out, in)`` matrix as it is read, on the CPU, before the weight
moves to the NPU (torch_npu has no float8 tensors on 910B). Nothing is written to disk.

- fp8_block -> hp: ``q * s`` per 128 x 128 block in float32 (exact: an e4m3 value times a float32
  scale is representable), returned in float32; the loader rounds it once to the compute dtype.
- fp8_block -> int8_w8a8: the float32 dequantized weight requantized symmetrically per output
  channel (``s = amax(|row|) / 127``, ``q = round(w / s)``), the format ``npu_quant_matmul`` and
  ``npu_grouped_matmul`` take with per-token activation scales.
"""

from __future__ import annotations

import torch

from dsv3.backends.cpu_ref.quant import dequantize, quantize_weight_int8
from dsv3.weights import FP8_BLOCK, HP, INT8_W8A8, Weight

#: What the plugin converts, and to what (the first target is the default).
CONVERT_FORMATS: dict[str, tuple[str, ...]] = {FP8_BLOCK: (HP, INT8_W8A8)}


def convert_weight(w: Weight, fmt: str) -> Weight:
    """w: fp8_block Weight ``data (out, in) float8_e4m3fn``, ``scale (ceil(out/128), ceil(in/128)) fp32``
    -> Weight in ``fmt``: hp ``(out, in) float32`` or int8_w8a8 ``data (out, in) int8, scale (out,) fp32``."""
    if w.fmt != FP8_BLOCK or fmt not in CONVERT_FORMATS[FP8_BLOCK]:
        raise ValueError(
            f"ascend converts fp8_block to {' or '.join(CONVERT_FORMATS[FP8_BLOCK])}, not {w.fmt} to {fmt}"
        )
    full = dequantize(w, torch.float32)  # (out, in)
    if fmt == HP:
        return Weight(full, HP)
    return quantize_weight_int8(full, INT8_W8A8)
