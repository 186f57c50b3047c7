"""The operator contract: every operator the model graph needs, as a pluggy hook.

A backend is a pluggy plugin (a module or object) registered under the entry-point group
``dsv3.backends``. It implements ``dsv3_backend_info`` and any subset of the ``dsv3_op_*`` hooks.

Each ``dsv3_op_*`` hook is asked once, when a model is built, with an :class:`OpRequest`
(the weight format, the activation-quantization mode, the compute dtype). It returns the
implementation, a plain callable with the signature given in the hook's docstring, or ``None``
to decline (for example a weight format its hardware cannot serve). What the chosen backend
declines is taken from ``cpu_ref`` and reported. Pluggy is never called per token.

Shapes use: B batch, T new tokens, S cache positions, N = B*T flattened tokens, H heads,
V vocabulary, E routed experts, k experts per token, C kv_lora_rank, R qk_rope_head_dim.
"compute dtype" is the model's activation dtype (bfloat16 or float32).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import pluggy
import torch

PROJECT = "dsv3"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@dataclass(frozen=True)
class OpRequest:
    """What the model asks a backend for when it resolves one operator.

    fmt: weight format (see ``dsv3.weights``); ``"hp"`` for ops without weights.
    act_quant: ``"none"`` (dequantize weights, multiply in the compute dtype) or ``"dynamic"``
        (quantize activations at run time and run a low-precision GEMM).
    dtype: the compute dtype.
    """

    fmt: str = "hp"
    act_quant: str = "none"
    dtype: torch.dtype = torch.bfloat16


@dataclass
class BackendInfo:
    """What a backend says about itself.

    name: the name users pass to ``--backend``.
    device: the torch device its tensors live on (``"cpu"``, ``"cuda"``, ``"npu"``...).
    dist_backend: the torch.distributed backend for many devices (gloo, nccl, hccl).
    formats: the weight formats it implements itself; others fall back to cpu_ref.
    unusable_reason: ``None`` when usable on this machine, else one line saying why not.
    prepare_weight: optional hook to convert a loaded weight into what the hardware needs
        (e.g. e4m3fn -> e4m3fnuz on MI300), called once per weight at load.
    convert_formats: checkpoint weight formats this backend cannot hold, each mapped to the
        formats it converts them to at load, default first (e.g. ascend:
        ``{"fp8_block": ("hp", "int8_w8a8")}``). The model is built in the target format and the
        loader converts each weight as it is read; nothing converted is written to disk.
    convert_weight: ``convert_weight(w: Weight (out, in) on the CPU, fmt: str) -> Weight in fmt``,
        called once per matrix (per expert for stacked experts) of each converted linear.
        An ``hp`` result may be float32: the loader casts it to the compute dtype.
    """

    name: str
    description: str
    device: str = "cpu"
    dist_backend: str = "gloo"
    formats: tuple[str, ...] = ("hp",)
    unusable_reason: str | None = None
    prepare_weight: Callable | None = None
    convert_formats: dict[str, tuple[str, ...]] = field(default_factory=dict)
    convert_weight: Callable | None = None
    extra: dict = field(default_factory=dict)


class BackendSpec:
    """Hook specifications. Implementations may take fewer arguments than the spec."""

    @hookspec(firstresult=True)
    def dsv3_backend_info(self) -> BackendInfo:
        """Describe this backend: name, device, communication backend, formats, usability."""

    # ------------------------------------------------------------------ norms / embedding
    @hookspec(firstresult=True)
    def dsv3_op_embedding(self, request: OpRequest) -> Callable | None:
        """``embedding(ids (B, T) int64, weight (V, D) compute dtype) -> (B, T, D) compute dtype``.

        Row lookup. Never declines in cpu_ref.
        """

    @hookspec(firstresult=True)
    def dsv3_op_rms_norm(self, request: OpRequest) -> Callable | None:
        """``rms_norm(x (..., D) any float, weight (D,), eps: float) -> (..., D) x.dtype``.

        ``x / sqrt(mean(x**2) + eps) * weight``, computed in float32 and cast back to x.dtype.
        """

    # ------------------------------------------------------------------ rotary
    @hookspec(firstresult=True)
    def dsv3_op_rotary(self, request: OpRequest) -> Callable | None:
        """``rotary(x (B, T, H, R), cos (B, T, R/2) fp32, sin (B, T, R/2) fp32) -> (B, T, H, R) x.dtype``.

        Interleaved RoPE: adjacent pairs ``(x[2i], x[2i+1])`` rotate by the angle of
        frequency i. Computed in float32. Not in place.
        """

    # ------------------------------------------------------------------ MLA attention
    @hookspec(firstresult=True)
    def dsv3_op_attention(self, request: OpRequest) -> Callable | None:
        """Naive MLA attention over per-head keys and values.

        ``attention(q (B, T, H, Dqk), k (B, S, H, Dqk), v (B, S, H, Dv), q_pos (B, T) int64,
        scale: float) -> (B, T, H, Dv) q.dtype``.

        Key position j is visible to query (b, t) iff ``j <= q_pos[b, t]`` (causal over a cache
        whose index is the token position; entries past a row's position are ignored even if
        stale). Softmax in float32.
        """

    @hookspec(firstresult=True)
    def dsv3_op_mla_latent_attention(self, request: OpRequest) -> Callable | None:
        """Weight-absorbed MLA attention over the latent cache (prefill and decode).

        ``mla_latent_attention(q_latent (B, T, H, C), q_pe (B, T, H, R), kv (B, S, C),
        pe (B, S, R), q_pos (B, T) int64, scale: float) -> (B, T, H, C) q_latent.dtype``.

        ``score[b,t,h,j] = (q_latent[b,t,h]·kv[b,j] + q_pe[b,t,h]·pe[b,j]) * scale``, masked as
        in ``attention`` (j <= q_pos[b, t]), softmax in float32, output ``sum_j p * kv[b, j]``.
        """

    # ------------------------------------------------------------------ GEMM and quantization
    @hookspec(firstresult=True)
    def dsv3_op_linear(self, request: OpRequest) -> Callable | None:
        """``linear(x (..., in) compute dtype, w: Weight (out, in) in request.fmt) -> (..., out) x.dtype``.

        ``y = x @ dequant(w).T``. With ``act_quant == "none"`` the weight is dequantized and the
        product taken in the compute dtype. With ``"dynamic"``: fp8_block quantizes x per token per
        128 channels (s = amax/448, or the e4m3fnuz max 240, rounded up to a power of two when
        ``w.scale_fmt == "ue8m0"``) and int8_w8a8 per token (s = amax/127), then multiplies in the
        low-precision format with float32 accumulation. Declining a format is allowed.
        """

    @hookspec(firstresult=True)
    def dsv3_op_dequantize(self, request: OpRequest) -> Callable | None:
        """``dequantize(w: Weight (..., out, in) in request.fmt, dtype) -> (..., out, in) dtype``.

        The weight in high precision (block scales or channel scales applied). For ``hp``, a cast.
        """

    # ------------------------------------------------------------------ MoE
    @hookspec(firstresult=True)
    def dsv3_op_moe_gate(self, request: OpRequest) -> Callable | None:
        """``moe_gate(x (N, D), gate_weight (E, D) fp32, bias (E,) fp32 or None, routing: Routing)
        -> (weights (N, k) fp32, ids (N, k) int64)``.

        Scores = sigmoid or softmax of ``x @ gate_weight.T`` in float32 (``routing.scoring``).
        The bias (``e_score_correction_bias``) is added only to choose experts. With
        ``routing.n_group > 1`` groups are ranked (sum of top-2 biased scores per group with a
        bias, else the group's max) and only the ``topk_group`` best groups are eligible. The
        weights are the unbiased scores of the chosen experts, normalized to sum 1 when
        ``routing.norm_topk_prob`` (and k > 1), then multiplied by ``routing.scale``.
        """

    @hookspec(firstresult=True)
    def dsv3_op_moe_experts(self, request: OpRequest) -> Callable | None:
        """``moe_experts(x (N, D), weights (N, k) fp32, ids (N, k) int64, w1: Weight (E, I, D),
        w3: Weight (E, I, D), w2: Weight (E, D, I), expert_offset: int) -> (N, D) x.dtype``.

        ``sum_k weights[n, k] * w2[e] @ (silu(w1[e] @ x[n]) * (w3[e] @ x[n]))`` with
        ``e = ids[n, k] - expert_offset``; ids outside ``[offset, offset + E)`` belong to another
        rank and contribute nothing. Weights in request.fmt; linear semantics as ``linear``.
        """

    @hookspec(firstresult=True)
    def dsv3_op_silu_and_mul(self, request: OpRequest) -> Callable | None:
        """``silu_and_mul(gate (..., I), up (..., I)) -> (..., I)``: ``silu(gate) * up``."""

    # ------------------------------------------------------------------ sampling
    @hookspec(firstresult=True)
    def dsv3_op_sample(self, request: OpRequest) -> Callable | None:
        """``sample(logits (B, V) fp32, temperature (B,) fp32, top_p (B,) fp32,
        generator: torch.Generator | None) -> (B,) int64``.

        Rows with temperature 0 take the argmax. Others sample from softmax(logits / temperature)
        restricted to the smallest set of most likely tokens whose probability reaches top_p; that
        set always holds the most likely token, so a top_p no token reaches (0) keeps just it.
        Deterministic given the generator's state.
        """


#: Names of the operator hooks, without the ``dsv3_op_`` prefix, in contract order.
OP_NAMES: tuple[str, ...] = tuple(name[len("dsv3_op_") :] for name in vars(BackendSpec) if name.startswith("dsv3_op_"))
#: Operators that take a weight format (resolved once per format present in the model).
WEIGHT_OPS: tuple[str, ...] = ("linear", "dequantize", "moe_experts")
