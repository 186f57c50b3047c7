"""Layer-by-layer parity of two backends on the same checkpoint and tokens.

Each model is built with its own backend's operators (resolved once at load), so the checkpoint
is loaded twice. One full-sequence forward per model, with forward hooks capturing, in order:
the embedding output (``embed``), each layer's attention sublayer output (``layers.i.attn``), its
MoE/MLP sublayer output (``layers.i.ffn``) and its block output (``layers.i``), the final norm
(``norm``) and the logits (``logits``). Places are compared with the criterion of the
conformance kit, ``|a - b| <= rtol * (|b| + rms(b))``, and the first place beyond it is named.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..conformance.compare import compare_tensors
from ..conformance.tolerances import Tolerance
from ..errors import Dsv3Error
from ..model.graph import Transformer
from ..registry import REFERENCE, discover

#: Per-place tolerance by compute dtype. Errors compound along the residual stream, so these are
#: ~10x the per-operator tolerances of the conformance kit (float32 1e-5, bfloat16 2^-6).
PARITY_RTOL = {torch.float32: 1e-4, torch.bfloat16: 0.1, torch.float16: 2e-2}
#: Tokens used when neither a prompt nor ids are given: fixed, spread over the vocabulary.
DEFAULT_LENGTH = 12


@dataclass
class PlaceDiff:
    """How far the backend's output at one place is from the reference's."""

    place: str
    shape: tuple[int, ...]
    max_abs: float
    mean_abs: float
    ref_rms: float
    worst: float  # max over elements of err / allowed: <= 1 is within tolerance
    ok: bool
    message: str = ""


@dataclass
class ParityReport:
    """Per-place differences in forward order and the first place beyond tolerance."""

    backend: str
    against: str
    dtype: str
    rtol: float
    tokens: list[list[int]]
    places: list[PlaceDiff] = field(default_factory=list)

    @property
    def first_divergence(self) -> PlaceDiff | None:
        return next((p for p in self.places if not p.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_divergence is None

    def format_table(self) -> str:
        n_tok = sum(len(t) for t in self.tokens)
        lines = [
            f"dsv3 parity: backend {self.backend} against {self.against}, {self.dtype}, {n_tok} tokens, "
            f"tolerance {self.rtol:g} x (|ref| + rms(ref))",
            "",
            f"{'place':<18} {'max abs diff':>12} {'mean abs diff':>13} {'ref rms':>10} {'err/tol':>9}  result",
        ]
        for p in self.places:
            lines.append(
                f"{p.place:<18} {p.max_abs:>12.3e} {p.mean_abs:>13.3e} {p.ref_rms:>10.3e} {p.worst:>9.3g}  "
                f"{'ok' if p.ok else 'DIVERGES'}"
            )
        first = self.first_divergence
        lines.append("")
        if first is None:
            lines.append("no divergence beyond tolerance")
        else:
            lines.append(f"first divergence: {first.place} ({first.message})")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        def num(x: float):
            return None if math.isnan(x) or math.isinf(x) else x

        first = self.first_divergence
        return {
            "backend": self.backend,
            "against": self.against,
            "dtype": self.dtype,
            "rtol": self.rtol,
            "tokens": self.tokens,
            "ok": self.ok,
            "first_divergence": None if first is None else first.place,
            "places": [
                {
                    "place": p.place,
                    "shape": list(p.shape),
                    "max_abs": num(p.max_abs),
                    "mean_abs": num(p.mean_abs),
                    "ref_rms": num(p.ref_rms),
                    "err_over_tol": num(p.worst),
                    "ok": p.ok,
                }
                for p in self.places
            ],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


@torch.inference_mode()
def capture(model: Transformer, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Run ``tokens (B, T)`` through the model; the output at every place, in forward order (float32, CPU)."""
    acts: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        acts[name] = value.detach().float().cpu()

    handles = []
    if len(model.layers):
        handles.append(model.layers[0].register_forward_pre_hook(lambda _m, args: keep("embed", args[0])))
    for i, layer in enumerate(model.layers):
        for name, module in ((f"layers.{i}.attn", layer.attn), (f"layers.{i}.ffn", layer.ffn), (f"layers.{i}", layer)):
            handles.append(module.register_forward_hook(lambda _m, _a, out, name=name: keep(name, out)))
    handles.append(model.norm.register_forward_hook(lambda _m, _a, out: keep("norm", out)))
    try:
        hidden = model(tokens.to(model.embed.device))  # (B, T, D)
        keep("logits", model.logits(hidden))  # (B, T, V)
    finally:
        for h in handles:
            h.remove()
    return acts


def compare_captures(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor], rtol: float) -> list[PlaceDiff]:
    """Compare two captures place by place (forward order of ``ref``)."""
    tol = Tolerance("parity", rtol, "per-place parity tolerance")
    out = []
    for place, want in ref.items():
        have = got.get(place)
        if have is None or have.shape != want.shape:
            shape = None if have is None else tuple(have.shape)
            out.append(
                PlaceDiff(
                    place,
                    tuple(want.shape),
                    math.nan,
                    math.nan,
                    math.nan,
                    math.inf,
                    False,
                    f"shape {shape}, expected {tuple(want.shape)}",
                )
            )
            continue
        o = compare_tensors(have, want, tol)
        rms = float(want.double().pow(2).mean().sqrt()) if want.numel() else 0.0
        out.append(PlaceDiff(place, tuple(want.shape), o.max_abs, o.mean_abs, rms, o.worst, o.ok, o.message))
    return out


def parity_models(
    model: Transformer,
    reference: Transformer,
    tokens: torch.Tensor,
    rtol: float | None = None,
    backend: str | None = None,
    against: str | None = None,
) -> ParityReport:
    """Per-place parity of two built models on ``tokens (B, T)``."""
    dtype = model.opts.dtype
    rtol = PARITY_RTOL.get(dtype, 1e-4) if rtol is None else rtol
    got, want = capture(model, tokens), capture(reference, tokens)
    report = ParityReport(
        backend or model.ops.backend,
        against or reference.ops.backend,
        str(dtype).removeprefix("torch."),
        rtol,
        tokens.tolist(),
    )
    report.places = compare_captures(got, want, rtol)
    return report


def default_tokens(vocab_size: int, length: int = DEFAULT_LENGTH) -> list[int]:
    """A fixed token sequence spread over the vocabulary (no tokenizer needed)."""
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (length,), generator=g).tolist()


def check_tokens(tokens: Sequence[int], vocab_size: int) -> None:
    if not tokens:
        raise Dsv3Error("no tokens to run: give --prompt TEXT or --tokens IDS")
    for t in tokens:
        if not 0 <= t < vocab_size:
            raise Dsv3Error(f"token id {t} is outside the vocabulary [0, {vocab_size})")


def _check_has_layers(flag: str, name: str, backends: str, ckpt_path: str | Path | None) -> None:
    """A whole-graph backend (``BackendInfo.whole_model``, e.g. onnxruntime) exposes no layers to hook."""
    found = discover().get(name)
    if found is None or found.info is None or found.info.whole_model is None:
        return
    ckpt = "" if ckpt_path is None else f" --ckpt-path {ckpt_path}"
    raise Dsv3Error(
        f"{flag} {name}: this backend runs a whole exported graph, so it has no layers to compare; compare "
        f"its logits instead: dsv3 eval perplexity {backends}{ckpt} --text-file FILE"
    )


def run_parity(
    ckpt_path: str | Path | None,
    backend: str,
    against: str = REFERENCE,
    tokens: Sequence[int] | None = None,
    prompt: str | None = None,
    dtype: str = "float32",
    attn_impl: str = "absorb",
    act_quant: str = "none",
    rtol: float | None = None,
    config: str | Path | None = None,
    perturb: Callable[[Transformer], None] | None = None,
) -> ParityReport:
    """Load the checkpoint once per backend and compare them place by place on the same tokens.

    perturb: called on the ``backend`` model after loading (tests plant a single-layer error with it).
    """
    from ..runtime.loading import load

    for flag, name in (("--backend", backend), ("--against", against)):
        _check_has_layers(flag, name, f"--backend {backend} --against {against}", ckpt_path)
    engine = load(ckpt_path, backend, dtype, attn_impl, act_quant, config)
    reference = load(ckpt_path, against, dtype, attn_impl, act_quant, config)
    vocab = engine.cfg.vocab_size
    if prompt is not None:
        ids = engine.encode(prompt, chat=False)
    else:
        ids = list(tokens) if tokens is not None else default_tokens(vocab)
    check_tokens(ids, vocab)
    if perturb is not None:
        with torch.no_grad():
            perturb(engine.model)
    return parity_models(engine.model, reference.model, torch.tensor([ids]), rtol, backend, against)
