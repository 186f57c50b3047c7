"""Call-time fallback to cpu_ref, for inputs outside a fused operator's documented limits.

Some limits depend on shapes or routing only known when the operator runs (a head dim above 512,
a routing rule the gating operator does not implement). Such a call runs cpu_ref's PyTorch on the
same device and says so once per distinct reason: a fallback is never silent.
"""

from __future__ import annotations

import warnings


class AscendFallbackWarning(RuntimeWarning):
    """An ascend operator handed a call to cpu_ref (the message says which and why)."""


def warn_fallback(op: str, torch_npu_op: str, why: str) -> None:
    # Python's default warning filter prints each distinct message once per call site
    warnings.warn(f"ascend: {op} falls back to cpu_ref: {torch_npu_op} does not take {why}", AscendFallbackWarning, 2)
