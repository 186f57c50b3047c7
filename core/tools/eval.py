"""Model-level numerics: strided perplexity and, against a reference run, KL divergence and top-1 agreement.

What a backend or a weight format does to a model's answers is judged the way quantizations are
judged elsewhere (llama.cpp's ``perplexity --kl-divergence``): run the same tokens through the
model under test and through a reference (cpu_ref in float32, on the same checkpoint or on the
original one a quantized copy was made from), and compare the two next-token distributions at
every scored position.

Windows (Hugging Face's strided perplexity): window ``k`` feeds tokens ``[k*stride, k*stride +
context)`` and scores only the targets no earlier window scored; the first window scores all of
its tokens but the first. With ``stride < context`` every token after the first is scored exactly
once, each with at least ``context - stride`` tokens of context (except near the start). With
``stride == context`` the windows do not overlap and the first token of each later window, which
has no context inside its window, is not scored.

With ``mtp=True`` the first MTP module is scored too, on the same windows: its entry at t (the main
hidden state at t and token t+1) predicts token t+2, so its targets start one token later. Beside
its own perplexity / KL / top-1 figures, the greedy acceptance rate of one-token speculative
decoding along the text: the share of positions where the MTP module's argmax for token j equals
the main model's argmax for token j (what ``--mtp 1`` at temperature 0 would accept if decoding
followed this text; generation follows its own tokens, so its rate differs with the content).

Every figure is computed in float64 from the float32 logits, so two identical runs give a KL
divergence of exactly 0 and 100% agreement: the harness adds no error of its own.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from ..errors import Dsv3Error

#: ``tokens (B, T) int64 -> logits (B, T, V) float32``, e.g. ``Engine.logits``; with MTP scoring,
#: ``-> (logits (B, T, V), MTP logits (B, T-1, V))``, e.g. ``Engine.logits_with_mtp``.
LogitsFn = Callable[[torch.Tensor], torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Window:
    """Tokens ``[begin, end)`` go in; targets ``[first_target, end)`` are scored (``begin < first_target``)."""

    begin: int
    end: int
    first_target: int

    @property
    def length(self) -> int:
        return self.end - self.begin


def strided_windows(n_tokens: int, context: int, stride: int) -> list[Window]:
    """The sliding windows over a stream of ``n_tokens`` tokens (see the module docstring)."""
    if context < 2:
        raise Dsv3Error(f"--context {context}: a window needs at least 2 tokens")
    if not 1 <= stride <= context:
        raise Dsv3Error(f"--stride {stride}: must lie in [1, --context {context}]")
    if n_tokens < 2:
        raise Dsv3Error(f"{n_tokens} token(s): perplexity needs at least 2 tokens")
    windows, scored_to = [], 1  # targets below scored_to are done; token 0 is never a target
    for begin in range(0, n_tokens - 1, stride):
        end = min(begin + context, n_tokens)
        first = max(scored_to, begin + 1)
        if first < end:
            windows.append(Window(begin, end, first))
            scored_to = end
        if end == n_tokens:
            break
    return windows


@dataclass
class PositionStats:
    """Per scored position, float64 (N,): the test's and the reference's NLL of the target, KL(ref || test),
    whether the two argmax tokens agree, and the two probabilities of the target."""

    nll: torch.Tensor
    nll_ref: torch.Tensor | None = None
    kld: torch.Tensor | None = None
    same_top1: torch.Tensor | None = None
    p_target: torch.Tensor | None = None
    p_target_ref: torch.Tensor | None = None


def position_stats(
    logits: torch.Tensor, targets: torch.Tensor, logits_ref: torch.Tensor | None = None
) -> PositionStats:
    """logits (N, V) fp32 predicting targets (N,) int64; logits_ref (N, V) fp32 or None -> PositionStats.

    KL(ref || test) = sum_v p_ref(v) (log p_ref(v) - log p_test(v)), in float64.
    """
    logp = torch.log_softmax(logits.double(), dim=-1)  # (N, V)
    lp_target = logp.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    if logits_ref is None:
        return PositionStats(nll=-lp_target)
    if logits_ref.shape != logits.shape:
        raise Dsv3Error(
            f"the reference gives logits of shape {tuple(logits_ref.shape)}, the model under test "
            f"{tuple(logits.shape)}: the two checkpoints must share a vocabulary"
        )
    logp_ref = torch.log_softmax(logits_ref.double(), dim=-1)  # (N, V)
    lp_target_ref = logp_ref.gather(-1, targets[:, None]).squeeze(-1)  # (N,)
    p_ref = logp_ref.exp()
    # 0 * (-inf - x) would be nan: where p_ref is exactly 0 the term is 0
    terms = torch.where(p_ref > 0, p_ref * (logp_ref - logp), torch.zeros_like(p_ref))
    return PositionStats(
        nll=-lp_target,
        nll_ref=-lp_target_ref,
        kld=terms.sum(-1),
        same_top1=logits.argmax(-1) == logits_ref.argmax(-1),
        p_target=lp_target.exp(),
        p_target_ref=lp_target_ref.exp(),
    )


def _cat(parts: list[PositionStats]) -> PositionStats:
    fields = {}
    for name in PositionStats.__dataclass_fields__:
        values = [getattr(p, name) for p in parts]
        fields[name] = None if values[0] is None else torch.cat(values)
    return PositionStats(**fields)


@dataclass
class EvalReport:
    """The figures of one perplexity run (and its comparison with a reference when there is one).

    ppl = exp(mean NLL) over the scored tokens. ln_ppl_ratio = mean(NLL_test - NLL_ref) with its
    standard error; ppl_ratio = exp of it (test / reference). kld_*: KL(ref || test) per position in
    nats; top1_agreement: % of positions where both runs' most likely next token is the same;
    rms_delta_p: RMS over positions of p_test(target) - p_ref(target), in percentage points.
    nonfinite: positions where either run's logits held a NaN or infinity (their figures are nan).
    """

    n_tokens: int
    n_windows: int
    context: int
    stride: int
    n_scored: int
    ppl: float
    nll_mean: float
    nonfinite: int = 0
    ppl_ref: float | None = None
    ppl_ratio: float | None = None
    ln_ppl_ratio: float | None = None
    ln_ppl_ratio_stderr: float | None = None
    kld_mean: float | None = None
    kld_stderr: float | None = None
    kld_median: float | None = None
    kld_p99: float | None = None
    kld_max: float | None = None
    top1_agreement: float | None = None
    top1_same: int | None = None
    rms_delta_p: float | None = None
    setup: dict | None = None  # what was run: backends, checkpoints, dtypes, text (filled by the caller)
    mtp: EvalReport | None = None  # the first MTP module's figures (targets t+2), when scored
    mtp_greedy_acceptance: float | None = None  # % of MTP argmaxes equal to the main model's (test run)
    mtp_greedy_acceptance_ref: float | None = None  # the same in the reference run

    @property
    def has_reference(self) -> bool:
        return self.kld_mean is not None

    def to_dict(self) -> dict:
        """JSON-ready: non-finite floats become None (JSON has no NaN)."""
        out = asdict(self)
        if self.mtp is not None:
            out["mtp"] = self.mtp.to_dict()
        return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}

    def format_text(self) -> str:
        lines = [
            f"{self.n_tokens:,} tokens, {self.n_windows} window(s) of context {self.context} stride {self.stride}, "
            f"{self.n_scored:,} scored"
        ]
        setup = self.setup or {}
        if "context_source" in setup:
            lines.append(f"  context    {self.context} tokens: {setup['context_source']}")
        if "test" in setup:
            lines.append(f"  test       {setup['test']}")
        if "reference" in setup:
            lines.append(f"  reference  {setup['reference']}")
        if not self.has_reference:
            lines.append(f"  perplexity       {self.ppl:.4f}   (mean NLL {self.nll_mean:.5f} nats/token)")
        else:
            lines += [
                f"  perplexity       test {self.ppl:.4f}   reference {self.ppl_ref:.4f}   ratio {self.ppl_ratio:.5f}"
                f"   (ln ratio {self.ln_ppl_ratio:+.2e} +/- {self.ln_ppl_ratio_stderr:.1e})",
                f"  KL divergence    mean {self.kld_mean:.3e} +/- {self.kld_stderr:.1e}   median {self.kld_median:.3e}"
                f"   p99 {self.kld_p99:.3e}   max {self.kld_max:.3e}",
                f"  top-1 agreement  {self.top1_agreement:.2f} %  ({self.top1_same:,} / {self.n_scored:,})",
                f"  RMS delta p      {self.rms_delta_p:.3f} %",
            ]
        if self.nonfinite:
            lines.append(f"  WARNING: {self.nonfinite} position(s) with non-finite logits (figures are nan)")
        if self.mtp is not None:
            body = self.mtp.format_text().splitlines()[1:]
            body = [line for line in body if not line.startswith(("  test ", "  reference "))]
            accept = f"test {self.mtp_greedy_acceptance:.2f} %"
            if self.mtp_greedy_acceptance_ref is not None:
                accept += f"   reference {self.mtp_greedy_acceptance_ref:.2f} %"
            lines += [f"MTP module (predicts token t+2; {self.mtp.n_scored:,} scored)", *body]
            lines.append(f"  greedy acceptance (--mtp 1, temperature 0)  {accept}")
        return "\n".join(lines)


def _mean_stderr(x: torch.Tensor) -> tuple[float, float]:
    n = x.numel()
    mean = float(x.mean())
    return mean, float(x.std() / math.sqrt(n)) if n > 1 else 0.0


def summarize(stats: PositionStats, n_tokens: int, windows: list[Window], context: int, stride: int) -> EvalReport:
    """Reduce per-position figures to an EvalReport."""
    n = stats.nll.numel()
    nll_mean = float(stats.nll.mean())
    finite = torch.isfinite(stats.nll)
    if stats.kld is not None:
        finite &= torch.isfinite(stats.kld) & torch.isfinite(stats.nll_ref)
    report = EvalReport(
        n_tokens=n_tokens,
        n_windows=len(windows),
        context=context,
        stride=stride,
        n_scored=n,
        ppl=math.exp(nll_mean) if math.isfinite(nll_mean) else math.nan,
        nll_mean=nll_mean,
        nonfinite=int((~finite).sum()),
    )
    if stats.kld is None:
        return report
    kld = stats.kld
    q = torch.quantile(kld, torch.tensor([0.5, 0.99], dtype=kld.dtype)) if kld.numel() <= 16_000_000 else None
    nll_ref_mean = float(stats.nll_ref.mean())
    ln_ratio, ln_ratio_err = _mean_stderr(stats.nll - stats.nll_ref)
    report.ppl_ref = math.exp(nll_ref_mean) if math.isfinite(nll_ref_mean) else math.nan
    report.ln_ppl_ratio, report.ln_ppl_ratio_stderr = ln_ratio, ln_ratio_err
    report.ppl_ratio = math.exp(ln_ratio) if math.isfinite(ln_ratio) else math.nan
    report.kld_mean, report.kld_stderr = _mean_stderr(kld)
    report.kld_median = float(q[0]) if q is not None else float(kld.median())
    report.kld_p99 = float(q[1]) if q is not None else math.nan
    report.kld_max = float(kld.max())
    report.top1_same = int(stats.same_top1.sum())
    report.top1_agreement = 100.0 * report.top1_same / n
    report.rms_delta_p = 100.0 * float((stats.p_target - stats.p_target_ref).pow(2).mean().sqrt())
    return report


def _batches(windows: list[Window], batch: int) -> list[list[Window]]:
    """Consecutive windows of equal length, at most ``batch`` at a time (one forward each)."""
    out: list[list[Window]] = []
    for w in windows:
        if out and len(out[-1]) < batch and out[-1][0].length == w.length:
            out[-1].append(w)
        else:
            out.append([w])
    return out


def evaluate(
    logits_fn: LogitsFn,
    tokens: list[int] | torch.Tensor,
    context: int,
    stride: int,
    reference: LogitsFn | None = None,
    batch: int = 1,
    progress: bool | None = None,
    mtp: bool = False,
) -> EvalReport:
    """Strided perplexity of ``tokens`` under ``logits_fn`` and, with a ``reference``, KL/top-1/ppl ratio.

    tokens: the whole stream (N,) int64 (with its BOS, if the model expects one).
    context, stride: window length and step (``strided_windows``); batch: windows per forward.
    progress: a tqdm bar on stderr (None: only on a terminal).
    mtp: also score the first MTP module (``logits_fn`` and ``reference`` return (main, MTP) logits).
    """
    stream = torch.as_tensor(tokens, dtype=torch.long).flatten()
    if batch < 1:
        raise Dsv3Error(f"--batch {batch}: must be at least 1")
    windows = strided_windows(stream.numel(), context, stride)
    total = sum(w.end - w.first_target for w in windows)
    parts: list[PositionStats] = []
    mtp_parts: list[PositionStats] = []
    accepted: list[torch.Tensor] = []
    accepted_ref: list[torch.Tensor] = []
    kld_sum, kld_n = 0.0, 0
    bar = tqdm(total=total, desc="perplexity", unit="tok", disable=None if progress is None else not progress)
    with bar:
        for group in _batches(windows, batch):
            inputs = torch.stack([stream[w.begin : w.end] for w in group])  # (B, T)
            logits = logits_fn(inputs)  # (B, T, V)
            logits_ref = reference(inputs) if reference is not None else None
            mtp_logits = mtp_ref = None
            if mtp:
                logits, mtp_logits = logits
                if logits_ref is not None:
                    logits_ref, mtp_ref = logits_ref
            for row, w in enumerate(group):
                if mtp:
                    _score_mtp(
                        row, w, stream, logits, mtp_logits, logits_ref, mtp_ref, mtp_parts, accepted, accepted_ref
                    )
                pos = slice(w.first_target - w.begin - 1, w.end - w.begin - 1)  # logit t predicts token t+1
                targets = stream[w.first_target : w.end]
                ref_rows = logits_ref[row, pos].float() if logits_ref is not None else None
                parts.append(position_stats(logits[row, pos].float(), targets, ref_rows))
                if parts[-1].kld is not None:
                    kld_sum, kld_n = kld_sum + float(parts[-1].kld.sum()), kld_n + targets.numel()
                bar.update(targets.numel())
            if kld_n:
                bar.set_postfix(mean_kld=f"{kld_sum / kld_n:.2e}", refresh=False)
    report = summarize(_cat(parts), stream.numel(), windows, context, stride)
    if mtp and mtp_parts:
        report.mtp = summarize(_cat(mtp_parts), stream.numel(), windows, context, stride)
        report.mtp_greedy_acceptance = 100.0 * float(torch.cat(accepted).double().mean())
        if accepted_ref:
            report.mtp_greedy_acceptance_ref = 100.0 * float(torch.cat(accepted_ref).double().mean())
    return report


def _score_mtp(row, w: Window, stream, logits, mtp_logits, logits_ref, mtp_ref, parts, accepted, accepted_ref) -> None:
    """One window's MTP figures: targets j in [max(first_target, begin + 2), end), MTP entry j - 2 predicts j."""
    first = max(w.first_target, w.begin + 2)
    if first >= w.end:
        return
    pos = slice(first - w.begin - 2, w.end - w.begin - 2)  # MTP entry t predicts token t+2
    main_pos = slice(first - w.begin - 1, w.end - w.begin - 1)  # the main model's prediction of the same token
    ref_rows = mtp_ref[row, pos].float() if mtp_ref is not None else None
    parts.append(position_stats(mtp_logits[row, pos].float(), stream[first : w.end], ref_rows))
    accepted.append(mtp_logits[row, pos].argmax(-1) == logits[row, main_pos].argmax(-1))
    if mtp_ref is not None:
        accepted_ref.append(mtp_ref[row, pos].argmax(-1) == logits_ref[row, main_pos].argmax(-1))
