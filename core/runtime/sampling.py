"""Sampling arithmetic shared by the reference sample op, speculative decoding and the server: plain PyTorch."""

from __future__ import annotations

import numbers

import torch

from ..errors import Dsv3Error


class SamplingError(Dsv3Error):
    """A bad sampling parameter: ``param`` names the field, ``reason`` says what it must be.

    The message is ``"<param> <reason>"``; the CLI names its flag instead and the server answers
    400 naming ``param``.
    """

    def __init__(self, param: str, reason: str):
        super().__init__(f"{param} {reason}")
        self.param, self.reason = param, reason


def is_int(x: object) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def is_real(x: object) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def finite_logits(logits: torch.Tensor, what: str = "logits") -> torch.Tensor:
    """``logits`` to sample from, or a Dsv3Error when a row has no distribution to draw from: a NaN or
    +inf anywhere in it, or nothing above -inf (its maximum is not finite). -inf alone is a masked
    token, which the sample op accepts (a conformance case).

    A weight that overflows the compute dtype (a finite 3e38 in fp32 makes inf downstream) passes
    the load-time check and would otherwise surface as torch.multinomial's error. One reduction and
    one host sync per call. (dsv3 eval counts non-finite logits instead.)
    """
    if not bool(torch.isfinite(logits.amax(dim=-1)).all()):  # amax propagates NaN
        raise Dsv3Error(
            f"the model's {what} hold inf or NaN: a weight of this checkpoint overflows {logits.dtype} "
            "(look at its largest values), or a backend op is wrong (dsv3 parity compares each layer with cpu_ref)"
        )
    return logits


def nucleus(logits: torch.Tensor, temperature: torch.Tensor, top_p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (B, V), temperature (B,), top_p (B,) -> the top-p nucleus of softmax(logits / T), sorted.

    Returns (probabilities (B, V) fp32 in descending order, zero outside the nucleus and not
    renormalized; their token ids (B, V) int64). The nucleus is the smallest set of most likely
    tokens whose mass reaches top_p; it always holds the most likely token, so a top_p that no
    token reaches (0, or smaller than every probability) keeps just that one, as vLLM does.
    Rows with temperature <= 0 are computed at temperature 1 (the caller takes their argmax).
    Logits are shifted by their maximum before the division, so a tiny temperature gives the
    argmax's one-hot instead of inf / inf.
    """
    logits = logits.float()
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature)).unsqueeze(-1)
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / t, dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(-1) - sorted_p >= top_p.unsqueeze(-1)  # mass before a token already reaches top_p
    outside[:, 0] = False
    return sorted_p.masked_fill(outside, 0.0), order


def generator_groups(
    generators: list[torch.Generator | None], shared: torch.Generator | None, device: torch.device | str
) -> list[tuple[torch.Tensor, torch.Generator | None]]:
    """The groups of rows that draw together: (row indices (n,) int64, generator).

    Rows without a generator of their own draw together from ``shared``; each row with one (a seeded
    request) draws alone, so its tokens are the ones it would get in a batch of one.
    """
    shared_rows = [i for i, g in enumerate(generators) if g is None]
    groups = [(torch.tensor(shared_rows, device=device), shared)] if shared_rows else []
    return groups + [(torch.tensor([i], device=device), g) for i, g in enumerate(generators) if g is not None]


def sample_rows(
    sample,
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generators: list[torch.Generator | None],
    shared: torch.Generator | None,
) -> torch.Tensor:
    """logits (B, V) fp32, temperature (B,), top_p (B,) -> (B,) int64 through the backend's ``sample`` op,
    one call per :func:`generator_groups` group."""
    out = torch.empty(logits.shape[0], dtype=torch.long, device=logits.device)
    for idx, g in generator_groups(generators, shared, logits.device):
        out[idx] = sample(logits[idx], temperature[idx], top_p[idx], g)
    return out
