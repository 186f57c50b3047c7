"""Training objectives: next-token cross-entropy plus the multi-token-prediction (MTP) loss.

The MTP objective (DeepSeek-V3 paper, section 2.2): with ``D`` MTP modules, module ``k``
(0-indexed here) combines the previous depth's hidden state at position ``i`` (the main model's
final-normed hidden for ``k = 0``, else module ``k - 1``'s output) with the embedding of token
``i + k + 1`` and predicts token ``i + k + 2``. Its cross-entropy ``L_k`` is averaged over the
positions that have a target, and ``L_MTP = lambda / D * sum_k L_k``.

Everything runs as full-sequence forwards without a cache (positions ``0..T'-1``), so gradients
flow through the model's operators (the cpu_ref backend is plain PyTorch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import Dsv3Error
from ..model.graph import Transformer


def mtp_depth_losses(model: Transformer, tokens: torch.Tensor, main_hidden: torch.Tensor) -> list[torch.Tensor]:
    """Cross-entropy of every MTP depth, chained as in the paper.

    tokens (B, T) int64, main_hidden (B, T, D) (the main model's final-normed hidden states)
    -> one scalar float32 per MTP module. Depth ``k`` needs ``T >= k + 3``; deeper modules
    without any target position are left out.
    """
    _, t = tokens.shape
    losses = []
    hidden = main_hidden
    for k in range(len(model.mtp)):
        n = t - 1 - k  # positions i = 0..n-1 that have token i + k + 1
        if n < 2:  # no position with a target token i + k + 2
            break
        positions = torch.arange(n, device=tokens.device).expand(tokens.shape[0], n)  # (B, n)
        hidden = model.mtp_forward(k, hidden[:, :n], tokens[:, k + 1 :], positions)  # (B, n, D)
        logits = model.mtp[k].logits(hidden[:, : n - 1])  # (B, n-1, V) float32, targets i + k + 2
        target = tokens[:, k + 2 :]  # (B, n-1)
        losses.append(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)))
    return losses


def mtp_loss(model: Transformer, tokens: torch.Tensor, main_hidden: torch.Tensor, lam: float) -> torch.Tensor:
    """``lam / D * sum_k L_k`` (scalar float32); tokens (B, T) int64, main_hidden (B, T, D)."""
    losses = mtp_depth_losses(model, tokens, main_hidden)
    if not losses:
        return main_hidden.new_zeros((), dtype=torch.float32)
    return lam * torch.stack(losses).mean()


def lm_and_mtp_loss(
    model: Transformer, tokens: torch.LongTensor, mtp_weight: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training loss of a batch: ``(total, main_ce, mtp_ce)``, each a float32 scalar.

    tokens: (B, T) int64 token ids, T >= 2. ``main_ce`` is the next-token cross-entropy of the
    main model over positions 0..T-2; ``mtp_ce`` is the mean over MTP depths of their
    cross-entropy (depth k predicts token i + k + 2; see the module docstring), zero when the
    model has no MTP layers; ``total = main_ce + mtp_weight * mtp_ce`` (the paper's lambda).
    The forwards run without a cache, in the model's attention form (naive or absorbed), and
    keep the autograd graph: call ``total.backward()``.

    Raises Dsv3Error when ``mtp_weight`` is non-zero and the model has no MTP layers, or T < 2.
    """
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise Dsv3Error(f"tokens must be (batch, length >= 2); got shape {tuple(tokens.shape)}")
    if mtp_weight and not len(model.mtp):
        raise Dsv3Error("mtp_weight is non-zero but the model has no MTP layers (num_nextn_predict_layers=0)")
    hidden = model(tokens)  # (B, T, D), final-normed
    logits = model.logits(hidden[:, :-1])  # (B, T-1, V) float32
    main_ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
    losses = mtp_depth_losses(model, tokens, hidden)
    mtp_ce = torch.stack(losses).mean() if losses else main_ce.new_zeros(())
    return main_ce + mtp_weight * mtp_ce, main_ce, mtp_ce


# ------------------------------------------------------------------ initialisation and load balancing
#: Linears whose output is added to the residual stream: scaled down by 1/sqrt(2 * layers) at init.
_RESIDUAL_OUTPUTS = ("attn.wo.weight", "ffn.w2.weight", "shared.w2.weight")


def init_weights(model: Transformer, seed: int, std: float = 0.02) -> None:
    """Fill every parameter of ``model`` from ``seed`` (same seed -> bit-identical weights).

    Linears and embeddings ~ N(0, std); residual-branch outputs ~ N(0, std / sqrt(2 * layers));
    RMSNorm weights 1; routing biases 0. Parameters are visited in name order, so the values do
    not depend on module construction details.
    """
    import math

    from ..model.graph import MoE, RMSNorm

    gen = torch.Generator().manual_seed(seed)
    n_layers = model.cfg.num_hidden_layers + model.cfg.num_nextn_predict_layers
    residual_std = std / math.sqrt(2 * n_layers)
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, RMSNorm)}
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if id(param) in norm_weights:
                param.fill_(1.0)
                continue
            s = residual_std if name.endswith(_RESIDUAL_OUTPUTS) else std
            values = torch.randn(param.shape, generator=gen, dtype=torch.float32) * s
            param.copy_(values.to(param.dtype))
        for module in model.modules():
            if isinstance(module, MoE) and module.gate_bias is not None:
                module.gate_bias.zero_()


def tie_mtp_shared(model: Transformer) -> None:
    """Make every MTP module use the main embedding and output head (shared, as in the paper)."""
    for mtp in model.mtp:
        mtp.embed = model.embed
        mtp.head.weight = model.head.weight


def moe_modules(model: torch.nn.Module) -> list:
    """``(name, MoE)`` for every MoE layer of the model (main layers and MTP blocks), in name order."""
    from ..model.graph import MoE

    return [(n, m) for n, m in model.named_modules() if isinstance(m, MoE)]


def start_load_counting(model: torch.nn.Module) -> None:
    """Reset each MoE's ``load`` counter to zeros (E,) float32 so forwards count tokens per expert."""
    for _, moe in moe_modules(model):
        moe.load = torch.zeros(moe.gate_weight.shape[0], dtype=torch.float32, device=moe.gate_weight.device)


def stop_load_counting(model: torch.nn.Module) -> None:
    """Stop counting expert loads (``load = None``)."""
    for _, moe in moe_modules(model):
        moe.load = None


def update_routing_bias(model: torch.nn.Module, gamma: float) -> None:
    """Auxiliary-loss-free balancing: ``bias_e += gamma * sign(mean_load - load_e)``, then reset the counts.

    Overloaded experts become less likely to be chosen and underloaded ones more; the bias only
    steers the choice, never the gating weights. Requires ``start_load_counting`` beforehand.
    """
    with torch.no_grad():
        for name, moe in moe_modules(model):
            if moe.load is None:
                raise RuntimeError(f"{name}: expert loads are not being counted (call start_load_counting)")
            if moe.gate_bias is not None:
                moe.gate_bias += gamma * torch.sign(moe.load.mean() - moe.load)
            moe.load.zero_()
