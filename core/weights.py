"""Weight formats: a linear layer's weight carries its own format.

Formats (the names used everywhere: hooks, `dsv3 backends`, configs):

- ``hp``: high precision, a plain float tensor (bfloat16, float16 or float32).
- ``fp8_block``: the released DeepSeek-V3 format. ``data (out, in) float8_e4m3fn`` (or
  ``float8_e4m3fnuz`` on MI300-class GPUs) and ``scale (ceil(out/128), ceil(in/128)) float32``;
  the dequantized block is ``data_block * scale`` (the checkpoint calls it ``weight_scale_inv``).
- ``int8_w8a8``: ``data (out, in) int8``, ``scale (out,) float32`` per output channel; activations
  are quantized per token at run time when ``act_quant == "dynamic"``.
- ``int8_wo``: like ``int8_w8a8`` but activations always stay in the compute dtype.

Non-finite values (one rule for every backend; NaN and inf propagate, nothing becomes finite
silently). Per quantization group (a 1 x 128 activation group, a 128 x 128 weight tile, an int8 row):

1. A group holding any NaN or +-inf gets a NaN scale (``amax`` is NaN there; :data:`AMAX_FLOOR`
   raises only finite amaxes). NaN rather than inf: ``(q . w) * NaN`` is NaN whatever a GEMM makes
   of the codes, and a packed UE8M0 (E8M0) scale byte has a NaN (0xFF) but no inf.
2. Every value of such a group quantizes to NaN (``x / NaN``): fp8 e4m3fn stores 0x7F or 0xFF (the
   sign is not part of the rule), e4m3fnuz (MI300) 0x80, its only NaN (it has no -0). int8 has no
   NaN: it stores 0, and the NaN scale carries the group. Other groups quantize as if it were not
   there (``q = cast(clamp(x / scale, -max, max))``; no quotient is +-inf).
3. UE8M0 rounding rounds finite positive scales up to a power of two; +inf and NaN stay as they are
   (never 1.0). Scales are held as float32.
4. Hence a dequantized group (``q * scale``) that held a NaN or an inf is NaN in every element, and
   with ``act_quant == "dynamic"`` every output of a linear whose sum reads such an activation group
   or weight tile is NaN: never finite, never an inf. Scales read from a checkpoint are applied as
   they are: a NaN or inf scale makes its block NaN or non-finite (``0 * inf`` is NaN).
5. Converting e4m3fn to e4m3fnuz maps NaN (0x7F, 0xFF) to 0x80 and -0 (0x80) to 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

HP = "hp"
FP8_BLOCK = "fp8_block"
INT8_W8A8 = "int8_w8a8"
INT8_WO = "int8_wo"
FORMATS = (HP, FP8_BLOCK, INT8_W8A8, INT8_WO)

FP8_BLOCK_SIZE = 128
#: Largest finite value of each fp8 storage dtype (e4m3fnuz: AMD MI300's variant).
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e4m3fnuz: 240.0}
FP8_DTYPES = tuple(FP8_MAX)
INT8_MAX = 127.0
#: Floor on a block's (or row's, or activation group's) amax: keeps the scale of an all-zero group finite,
#: as DeepGEMM does. Every backend uses it, so all-zero inputs quantize alike everywhere. A group holding a
#: NaN or an inf has a NaN amax, which stays NaN (rule 1 of the module docstring).
AMAX_FLOOR = 1e-4
#: Scale formats a quantization_config may name ("ue8m0": scales are powers of two).
SCALE_FMTS = (None, "ue8m0")

ACT_QUANT_MODES = ("none", "dynamic")


@dataclass
class Weight:
    """A linear weight ``(out, in)`` (or a stack ``(E, out, in)`` for routed experts) and its scales."""

    data: torch.Tensor
    fmt: str = HP
    scale: torch.Tensor | None = None
    block_size: int = FP8_BLOCK_SIZE
    scale_fmt: str | None = None  # "ue8m0": activation scales rounded up to a power of two

    @property
    def out_features(self) -> int:
        return self.data.shape[-2]

    @property
    def in_features(self) -> int:
        return self.data.shape[-1]

    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        if self.scale is not None:
            n += self.scale.numel() * self.scale.element_size()
        return n

    def to(self, device: torch.device | str) -> Weight:
        scale = None if self.scale is None else self.scale.to(device)
        return Weight(self.data.to(device), self.fmt, scale, self.block_size, self.scale_fmt)


def fp8_scale_shape(out_features: int, in_features: int, block: int = FP8_BLOCK_SIZE) -> tuple[int, int]:
    """Shape of the per-block scale of an ``(out, in)`` fp8 weight."""
    return (-(-out_features // block), -(-in_features // block))
