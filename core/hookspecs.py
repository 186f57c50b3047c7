"""The operator contract: every operator the model graph needs, as a pluggy hook.

A backend is a pluggy plugin (a module or object) registered under the entry-point group
``dsv3.backends``. It implements ``dsv3_backend_info`` and any subset of the ``dsv3_op_*`` hooks.

Each ``dsv3_op_*`` hook is asked once, when a model is built, with an :class:`OpRequest`
(the weight format, the activation-quantization mode, the compute dtype). It returns the
implementation, a plain callable with the signature of the hook's return type (one
``typing.Protocol`` per operator below, shapes in its docstring and the hook's), or ``None``
to decline (for example a weight format its hardware cannot serve). Pluggy is never called per
token.

How backends compose: each is asked alone. The registry gives every discovered backend a
PluginManager of its own, holding just that plugin, made once at discovery; a model build asks
the chosen backend for each operator and takes what it declines from ``cpu_ref``, which never
declines (reported: ``OpTable.sources`` and ``OpTable.fallbacks``, and a line on stderr). Backends
never see each other, so pluggy's ordering markers (``tryfirst``/``trylast``) mean nothing here.

Versions: :data:`CONTRACT_VERSION` numbers this contract. A backend declares the version it was
written for in ``BackendInfo.contract_version``; the registry refuses any other version (and a
backend that declares none) with one line naming the plugin and both versions. Version 3 added the
paged latent cache operators ``paged_cache_write`` and ``mla_paged_attention``, version 4 their FP8
cache layout and ``BackendInfo.kv_cache_fp8`` (the comment at :data:`CONTRACT_VERSION` lists every version).

Shapes use: B batch, T new tokens, S cache positions, N = B*T flattened tokens, H heads,
V vocabulary, E routed experts, k experts per token, C kv_lora_rank, R qk_rope_head_dim,
P cache pages, page_size entries per page, M block-table width (pages per row at most).
"compute dtype" is the model's activation dtype (bfloat16 or float32).

The paged latent cache (``paged_cache_write``, ``mla_paged_attention``): one tensor per layer
``(P, page_size, C + R)`` holding, per token, the normalized latent (first C values) and the roped
key (last R values) side by side, as FlashMLA and vLLM store it. Cache position j of batch row b
lives in page ``block_table[b, j // page_size]`` at offset ``j % page_size``; a token is written
to its slot ``page * page_size + offset``. Pages are handed out by the caller (rows may share
pages, a freed page keeps whatever it held). The model graph's absorbed MLA form calls both for every
forward with a cache (``dsv3.model.cache``).

The FP8 latent cache (``--kv-cache-dtype fp8``, contract version 4): the same operators, handed a cache
whose dtype is an fp8 dtype (``float8_e4m3fn``, or ``float8_e4m3fnuz``): ``(P, page_size, W)`` with
``W = C + 4 * ceil(C / 128) + R * itemsize(compute dtype)`` bytes per entry (656 at the 671B shape in
bfloat16, FlashMLA's FP8 layout): bytes ``[0, C)`` the latent as fp8 values of the cache's dtype, bytes
``[C, C + 4G)`` G = ceil(C / 128) float32 scales (scale g for latent values ``128g .. 128g + 127``), bytes
``[C + 4G, W)`` the roped key in the compute dtype, unquantized. Latent value i reads back as
``fp8[i] * scale[i // 128]``; C is a multiple of 4. ``dsv3.model.fp8_cache`` defines the layout and its
encoding (scales ``max(amax, 1e-4) / fp8 max`` per tile, round to nearest even, a tile with a NaN or an
infinity gets a NaN scale). A backend lists the fp8 dtypes its cache operators handle in
``BackendInfo.kv_cache_fp8``; the model hands an fp8 cache only to a backend that lists its dtype (first
listed), else ``--kv-cache-dtype fp8`` is refused naming the backend.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import pluggy
import torch
from torch import Tensor

from .weights import Weight

if TYPE_CHECKING:
    from .model.config import Routing

PROJECT = "dsv3"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: This contract's version. 1: the unversioned contract of dsv3 0.1 (untyped, ``extra["whole_model"]``).
#: 2: an operator Protocol per hook, ``BackendInfo.contract_version`` and ``BackendInfo.whole_model``.
#: 3: the paged latent cache operators ``paged_cache_write`` and ``mla_paged_attention``. Later stated
#: within 3, with no signature change (checked by the conformance kit, not by the version): the non-finite
#: rule of ``dsv3.weights`` for quantized linears and dequantization, and moe_gate's normalization at k = 1.
#: 4: the FP8 latent cache layout of those two operators and ``BackendInfo.kv_cache_fp8``.
CONTRACT_VERSION = 4
#: The versions whose plugins this dsv3 runs: version 3 only added hooks, which cpu_ref fills for a
#: plugin written for version 2; version 4 only added the FP8 cache, which a plugin of version 2 or 3
#: does not declare (``kv_cache_fp8`` empty): the compute-dtype cache (``--kv-cache-dtype auto``) runs
#: on it as before, ``fp8`` is refused naming the backend.
COMPATIBLE_VERSIONS = (2, 3, 4)
#: Operators in the contract that the model graph does not call yet: resolved like the others, but a
#: backend declining them is not reported. None now (the paged cache ops were, until version 3's graph).
NOT_YET_CALLED: frozenset[str] = frozenset()


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


class MoeDispatchOp(Protocol):
    def __call__(
        self, x: Tensor, ids: Tensor, weights: Tensor, experts_per_rank: int, group: object, /
    ) -> tuple[Tensor, Tensor, Tensor, object]:
        """See ``BackendSpec.dsv3_comm_moe_dispatch``."""


class MoeCombineOp(Protocol):
    def __call__(self, y: Tensor, handle: object, /) -> Tensor:
        """See ``BackendSpec.dsv3_comm_moe_combine``."""


# ---------------------------------------------------------------------- operator signatures
# What each dsv3_op_* hook returns. Parameters are positional (an implementation may name them as
# it likes); shapes and semantics are in the hook of the same name below.
class EmbeddingOp(Protocol):
    def __call__(self, ids: Tensor, weight: Tensor, /) -> Tensor:
        """ids (B, T) int64, weight (V, D) -> (B, T, D) weight.dtype."""


class RmsNormOp(Protocol):
    def __call__(self, x: Tensor, weight: Tensor, eps: float, /) -> Tensor:
        """x (..., D), weight (D,) -> (..., D) x.dtype."""


class RotaryOp(Protocol):
    def __call__(self, x: Tensor, cos: Tensor, sin: Tensor, /) -> Tensor:
        """x (B, T, H, R), cos/sin (B, T, R/2) fp32 -> (B, T, H, R) x.dtype."""


class AttentionOp(Protocol):
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, q_pos: Tensor, scale: float, /) -> Tensor:
        """q (B, T, H, Dqk), k (B, S, H, Dqk), v (B, S, H, Dv), q_pos (B, T) int64 -> (B, T, H, Dv)."""


class MlaLatentAttentionOp(Protocol):
    def __call__(
        self, q_latent: Tensor, q_pe: Tensor, kv: Tensor, pe: Tensor, q_pos: Tensor, scale: float, /
    ) -> Tensor:
        """q_latent (B, T, H, C), q_pe (B, T, H, R), kv (B, S, C), pe (B, S, R), q_pos (B, T) -> (B, T, H, C)."""


class PagedCacheWriteOp(Protocol):
    def __call__(self, cache: Tensor, kv: Tensor, pe: Tensor, slot_mapping: Tensor, /) -> None:
        """cache (P, page_size, C + R) or fp8 (P, page_size, W) written in place, kv (N, C), pe (N, R),
        slot_mapping (N,) int64."""


class MlaPagedAttentionOp(Protocol):
    def __call__(
        self,
        q_latent: Tensor,
        q_pe: Tensor,
        cache: Tensor,
        block_table: Tensor,
        seq_lens: Tensor,
        scale: float,
        /,
    ) -> Tensor:
        """q_latent (B, T, H, C), q_pe (B, T, H, R), cache (P, page_size, C + R) or fp8 (P, page_size, W),
        block_table (B, M) int32, seq_lens (B,) int32 -> (B, T, H, C)."""


class LinearOp(Protocol):
    def __call__(self, x: Tensor, w: Weight, /) -> Tensor:
        """x (..., in), w (out, in) in the requested format -> (..., out) x.dtype."""


class DequantizeOp(Protocol):
    def __call__(self, w: Weight, dtype: torch.dtype, /) -> Tensor:
        """w (..., out, in) in the requested format -> (..., out, in) dtype."""


class MoeGateOp(Protocol):
    def __call__(
        self, x: Tensor, gate_weight: Tensor, bias: Tensor | None, routing: Routing, /
    ) -> tuple[Tensor, Tensor]:
        """x (N, D), gate_weight (E, D) fp32, bias (E,) fp32 or None -> weights (N, k) fp32, ids (N, k) int64."""


class MoeExpertsOp(Protocol):
    def __call__(
        self, x: Tensor, weights: Tensor, ids: Tensor, w1: Weight, w3: Weight, w2: Weight, expert_offset: int = 0, /
    ) -> Tensor:
        """x (N, D), weights/ids (N, k), w1/w3 (E, I, D), w2 (E, D, I) -> (N, D) x.dtype."""


class SiluAndMulOp(Protocol):
    def __call__(self, gate: Tensor, up: Tensor, /) -> Tensor:
        """gate, up (..., I) -> (..., I)."""


class SampleOp(Protocol):
    def __call__(
        self, logits: Tensor, temperature: Tensor, top_p: Tensor, generator: torch.Generator | None, /
    ) -> Tensor:
        """logits (B, V) fp32, temperature (B,), top_p (B,) -> (B,) int64."""


# ---------------------------------------------------------------------- load-time hooks of BackendInfo
class PrepareWeight(Protocol):
    def __call__(self, w: Weight, /) -> Weight | None:
        """A loaded weight (on the backend's device) -> the weight the hardware needs, or None to keep it."""


class CaptureGraph(Protocol):
    def __call__(self, step: Callable[[], Tensor], /) -> Callable[[], Tensor]:
        """``capture(step) -> replay``: record the device work of ``step`` once; ``replay()`` redoes it.

        ``step`` takes no arguments: it reads static tensors it closes over (inputs the caller refills
        in place before each replay, weights, the cache) and returns one tensor. ``replay()`` redoes the
        recorded work on the same memory and returns that same tensor object with new contents, as a CUDA
        graph does: Python values seen while capturing (shapes, ints, which branch was taken) are fixed.
        ``step`` may run a few times while capturing (warm-up); it must be safe to repeat (a decode step
        writes the same cache entries again). It must not copy device data to the host or make shapes that
        depend on data; ``capture`` raises (any exception) when it cannot record ``step``, and the caller
        then runs ``step`` eagerly.
        """


class ConvertWeight(Protocol):
    def __call__(self, w: Weight, fmt: str, /) -> Weight:
        """w (out, in) on the CPU in the checkpoint's format -> the same matrix in ``fmt``."""


class WholeModel(Protocol):
    """What a whole-graph backend's factory returns: the parts of a model that generation and scoring use."""

    cfg: Any  # dsv3.model.config.ModelConfig of the exported model

    def __call__(
        self, tokens: Tensor, positions: Tensor | None = None, cache: Any = None, rows: Tensor | None = None
    ) -> Tensor:
        """tokens (B, T) int64 -> hidden states (B, T, D) after the final norm (as ``Transformer.forward``)."""

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden (..., D) -> (..., V) float32."""

    def new_cache(self, max_batch: int, max_len: int) -> Any:
        """A cache for ``max_batch`` rows of ``max_len`` positions."""


class WholeModelFactory(Protocol):
    def __call__(
        self,
        path: Any,
        *,
        dtype: Any,
        attn_impl: str,
        act_quant: str,
        config: Any,
        weight_format: str | None,
        parallel: Any,
        progress: bool | None,
    ) -> WholeModel:
        """Load the checkpoint directory ``path`` as one whole graph (``dsv3.load``'s arguments)."""


@dataclass
class BackendInfo:
    """What a backend says about itself.

    name: the name users pass to ``--backend``.
    description: one line for ``dsv3 backends``.
    contract_version: the :data:`CONTRACT_VERSION` this backend was written for (0: none declared,
        refused like any other mismatch).
    device: the torch device its tensors live on (``"cpu"``, ``"cuda"``, ``"npu"``...).
    dist_backend: the torch.distributed backend for many devices (gloo, nccl, hccl).
    formats: the weight formats it implements itself; others fall back to cpu_ref.
    unusable_reason: ``None`` when usable on this machine, else one line saying why not.
    prepare_weight: convert a loaded weight into what the hardware needs (e.g. e4m3fn ->
        e4m3fnuz on MI300), called once per quantized weight at load; None: weights stay as loaded.
    convert_formats: checkpoint weight formats this backend cannot hold, each mapped to the
        formats it converts them to at load, default first (e.g. ascend:
        ``{"fp8_block": ("hp", "int8_w8a8")}``). The model is built in the target format and the
        loader converts each weight as it is read; nothing converted is written to disk.
    convert_weight: called once per matrix (per expert for stacked experts) of each converted
        linear; required with ``convert_formats``. An ``hp`` result may be float32: the loader
        casts it to the compute dtype.
    whole_model: set by a backend that runs whole exported graphs instead of an operator table
        (onnxruntime): ``dsv3.load`` calls it in place of building the model, and commands that
        need layers (``dsv3 parity``) or operators (``dsv3 conformance``) say they cannot use it.
        Such a backend implements no ``dsv3_op_*`` hook.
    kv_cache_fp8: the fp8 dtypes (``float8_e4m3fn``, ``float8_e4m3fnuz``) of the FP8 latent cache its
        ``paged_cache_write`` and ``mla_paged_attention`` read and write (the module docstring's layout),
        preferred first; empty: no FP8 cache (``--kv-cache-dtype fp8`` is refused on it).
    capture_graph: a :class:`CaptureGraph` (CUDA graphs on nvidia, HIP graphs on amd) that the runtime
        uses to replay the decode step, one graph per batch-size bucket (``dsv3.runtime.graphs``); None:
        every step runs eagerly. Optional and defaulted, so it changes no plugin of versions 2 to 4.
    extra: free-form facts for people (shown by nothing in dsv3's logic; e.g. the fp8 dtype).
    """

    name: str
    description: str
    contract_version: int = 0
    device: str = "cpu"
    dist_backend: str = "gloo"
    formats: tuple[str, ...] = ("hp",)
    unusable_reason: str | None = None
    prepare_weight: PrepareWeight | None = None
    convert_formats: dict[str, tuple[str, ...]] = field(default_factory=dict)
    convert_weight: ConvertWeight | None = None
    whole_model: WholeModelFactory | None = None
    kv_cache_fp8: tuple[torch.dtype, ...] = ()
    capture_graph: CaptureGraph | None = None
    extra: dict = field(default_factory=dict)


class BackendSpec:
    """Hook specifications. Implementations may take fewer arguments than the spec."""

    @hookspec(firstresult=True)
    def dsv3_backend_info(self) -> BackendInfo:
        """Describe this backend: name, device, communication backend, formats, usability."""

    # ------------------------------------------------------------------ norms / embedding
    @hookspec(firstresult=True)
    def dsv3_op_embedding(self, request: OpRequest) -> EmbeddingOp | None:
        """``embedding(ids (B, T) int64, weight (V, D) compute dtype) -> (B, T, D) compute dtype``.

        Row lookup. Never declines in cpu_ref.
        """

    @hookspec(firstresult=True)
    def dsv3_op_rms_norm(self, request: OpRequest) -> RmsNormOp | None:
        """``rms_norm(x (..., D) any float, weight (D,), eps: float) -> (..., D) x.dtype``.

        ``x / sqrt(mean(x**2) + eps) * weight``, computed in float32 and cast back to x.dtype.
        """

    # ------------------------------------------------------------------ rotary
    @hookspec(firstresult=True)
    def dsv3_op_rotary(self, request: OpRequest) -> RotaryOp | None:
        """``rotary(x (B, T, H, R), cos (B, T, R/2) fp32, sin (B, T, R/2) fp32) -> (B, T, H, R) x.dtype``.

        Interleaved RoPE: adjacent pairs ``(x[2i], x[2i+1])`` rotate by the angle of
        frequency i. Computed in float32. Not in place.
        """

    # ------------------------------------------------------------------ MLA attention
    @hookspec(firstresult=True)
    def dsv3_op_attention(self, request: OpRequest) -> AttentionOp | None:
        """Naive MLA attention over per-head keys and values.

        ``attention(q (B, T, H, Dqk), k (B, S, H, Dqk), v (B, S, H, Dv), q_pos (B, T) int64,
        scale: float) -> (B, T, H, Dv) q.dtype``.

        Key position j is visible to query (b, t) iff ``j <= q_pos[b, t]`` (causal over a cache
        whose index is the token position; entries past a row's position are ignored even if
        stale). Softmax in float32.
        """

    @hookspec(firstresult=True)
    def dsv3_op_mla_latent_attention(self, request: OpRequest) -> MlaLatentAttentionOp | None:
        """Weight-absorbed MLA attention over the latent cache (prefill and decode).

        ``mla_latent_attention(q_latent (B, T, H, C), q_pe (B, T, H, R), kv (B, S, C),
        pe (B, S, R), q_pos (B, T) int64, scale: float) -> (B, T, H, C) q_latent.dtype``.

        ``score[b,t,h,j] = (q_latent[b,t,h]·kv[b,j] + q_pe[b,t,h]·pe[b,j]) * scale``, masked as
        in ``attention`` (j <= q_pos[b, t]), softmax in float32, output ``sum_j p * kv[b, j]``.
        """

    @hookspec(firstresult=True)
    def dsv3_op_paged_cache_write(self, request: OpRequest) -> PagedCacheWriteOp | None:
        """Store new tokens' latent and roped key in a paged latent cache, in place.

        ``paged_cache_write(cache (P, page_size, C + R) compute dtype, kv (N, C) compute dtype,
        pe (N, R) compute dtype, slot_mapping (N,) int64) -> None``.

        For every token n with ``slot = slot_mapping[n] >= 0``:
        ``cache[slot // page_size, slot % page_size] = concat(kv[n], pe[n])`` (cast to cache.dtype).
        A negative slot is skipped (padding tokens); every other entry of the cache, including the
        rest of a page being written, is left as it was. Non-negative slots are distinct and below
        ``P * page_size``. ``kv``, ``pe`` and ``slot_mapping`` are not modified. Usually ``kv`` is the
        normalized latent and ``pe`` the roped key part of one layer (``mla_latent_attention``'s
        ``kv`` and ``pe``). The cache is a contiguous tensor (one per layer).

        FP8 cache (``cache`` of an fp8 dtype, ``(P, page_size, W)``, layout in the module docstring): the
        entry at the slot becomes token n's W bytes: its latent quantized per 128-value tile (fp8 values
        and float32 scales as ``dsv3.model.fp8_cache.quantize_latent``: bit-exact) and ``pe[n]`` in the
        compute dtype (kv.dtype) as is. Asked of a backend only when it lists ``cache.dtype`` in
        ``BackendInfo.kv_cache_fp8``.
        """

    @hookspec(firstresult=True)
    def dsv3_op_mla_paged_attention(self, request: OpRequest) -> MlaPagedAttentionOp | None:
        """Weight-absorbed MLA attention reading a paged latent cache (prefill, chunked prefill, decode).

        ``mla_paged_attention(q_latent (B, T, H, C) compute dtype, q_pe (B, T, H, R) compute dtype,
        cache (P, page_size, C + R) compute dtype, block_table (B, M) int32, seq_lens (B,) int32,
        scale: float) -> (B, T, H, C) q_latent.dtype``.

        ``mla_latent_attention`` over row b's first ``seq_lens[b]`` cache positions, entry j of row b
        being ``cache[block_table[b, j // page_size], j % page_size]``: its first C values are
        ``kv[b, j]``, its last R values ``pe[b, j]``. As there, ``q_latent`` is ``q_nope`` already
        multiplied by the key half of ``wkv_b`` (absorbed), the output is in the latent space (the
        caller applies the value half), ``score = (q_latent·kv + q_pe·pe) * scale``, softmax in
        float32. ``seq_lens`` counts the row's tokens including the T new ones, which the caller
        wrote first (``paged_cache_write``): query t of row b sits at position
        ``q_pos = seq_lens[b] - T + t`` and sees keys ``j <= q_pos`` (causal when T > 1; requires
        ``T <= seq_lens[b]``). A row's pages are ``block_table[b, :ceil(seq_lens[b] / page_size)]``
        (so ``M >= ceil(max(seq_lens) / page_size)``); later block-table entries hold anything (e.g.
        -1) and are never read, nor is any cache entry that is not one of row b's first
        ``seq_lens[b]`` positions (the rest of its last page, pages it does not list, freed pages):
        a NaN there must not reach the output. Rows may share pages. Inputs are not modified.

        FP8 cache (``cache`` of an fp8 dtype, ``(P, page_size, W)``, layout in the module docstring): entry
        j's ``kv`` is its latent dequantized (``fp8 * scale`` in float32, then rounded to the compute
        dtype), its ``pe`` the stored roped key; the attention is then the same. Unread entries hold any
        bytes (a NaN scale there must not reach the output either).
        """

    # ------------------------------------------------------------------ GEMM and quantization
    @hookspec(firstresult=True)
    def dsv3_op_linear(self, request: OpRequest) -> LinearOp | None:
        """``linear(x (..., in) compute dtype, w: Weight (out, in) in request.fmt) -> (..., out) x.dtype``.

        ``y = x @ dequant(w).T``. With ``act_quant == "none"`` the weight is dequantized and the
        product taken in the compute dtype. With ``"dynamic"``: fp8_block quantizes x per token per
        128 channels (s = amax/448, or the e4m3fnuz max 240, rounded up to a power of two when
        ``w.scale_fmt == "ue8m0"``) and int8_w8a8 per token (s = amax/127), then multiplies in the
        low-precision format with float32 accumulation. Declining a format is allowed.

        Non-finite values follow the rule in ``dsv3.weights`` (NaN and inf propagate, nothing becomes
        finite): with ``"dynamic"``, a 128-channel group (int8: a token) holding a NaN or an inf gets a
        NaN scale and NaN codes (int8: 0), so every output of that token is NaN, never finite or inf;
        UE8M0 rounding keeps inf and NaN scales. With ``"none"`` the product follows IEEE arithmetic
        on the dequantized weight.
        """

    @hookspec(firstresult=True)
    def dsv3_op_dequantize(self, request: OpRequest) -> DequantizeOp | None:
        """``dequantize(w: Weight (..., out, in) in request.fmt, dtype) -> (..., out, in) dtype``.

        The weight in high precision (block scales or channel scales applied). For ``hp``, a cast.
        Codes and scales are multiplied as stored, in float32: a NaN code or a NaN/inf scale gives NaN
        or inf (``0 * inf`` is NaN), never a finite value (``dsv3.weights``, non-finite rule).
        """

    # ------------------------------------------------------------------ MoE
    @hookspec(firstresult=True)
    def dsv3_op_moe_gate(self, request: OpRequest) -> MoeGateOp | None:
        """``moe_gate(x (N, D), gate_weight (E, D) fp32, bias (E,) fp32 or None, routing: Routing)
        -> (weights (N, k) fp32, ids (N, k) int64)``.

        Scores = sigmoid or softmax of ``x @ gate_weight.T`` in float32 (``routing.scoring``).
        The bias (``e_score_correction_bias``) is added only to choose experts. With
        ``routing.n_group > 1`` groups are ranked (sum of top-2 biased scores per group with a
        bias, else the group's max) and only the ``topk_group`` best groups are eligible. The
        weights are the unbiased scores of the chosen experts, normalized to sum 1 when
        ``routing.norm_topk_prob`` (for any k: with k = 1 the weight is ``routing.scale``, as in the
        official model, transformers and vLLM), then multiplied by ``routing.scale``.
        """

    @hookspec(firstresult=True)
    def dsv3_op_moe_experts(self, request: OpRequest) -> MoeExpertsOp | None:
        """``moe_experts(x (N, D), weights (N, k) fp32, ids (N, k) int64, w1: Weight (E, I, D),
        w3: Weight (E, I, D), w2: Weight (E, D, I), expert_offset: int) -> (N, D) x.dtype``.

        ``sum_k weights[n, k] * w2[e] @ (silu(w1[e] @ x[n]) * (w3[e] @ x[n]))`` with
        ``e = ids[n, k] - expert_offset``; ids outside ``[offset, offset + E)`` belong to another
        rank and contribute nothing. Weights in request.fmt; linear semantics as ``linear``, non-finite
        values included: a token's NaN or inf reaches only that token's output.
        """

    @hookspec(firstresult=True)
    def dsv3_op_silu_and_mul(self, request: OpRequest) -> SiluAndMulOp | None:
        """``silu_and_mul(gate (..., I), up (..., I)) -> (..., I)``: ``silu(gate) * up``."""

    # ------------------------------------------------------------------ sampling
    @hookspec(firstresult=True)
    def dsv3_op_sample(self, request: OpRequest) -> SampleOp | None:
        """``sample(logits (B, V) fp32, temperature (B,) fp32, top_p (B,) fp32,
        generator: torch.Generator | None) -> (B,) int64``.

        Rows with temperature 0 take the argmax. Others sample from softmax(logits / temperature)
        restricted to the smallest set of most likely tokens whose probability reaches top_p; that
        set always holds the most likely token, so a top_p no token reaches (0) keeps just it.
        Deterministic given the generator's state.
        """

    # ------------------------------------------------------------------ communication (optional)
    # Not operators (no OpRequest, not in OP_NAMES): a backend returning None gets the reference in
    # dsv3.model.ep_comm (torch.distributed all_to_all_single, works on gloo). Adding them changes no
    # existing hook, so plugins of versions 2 to 4 run unchanged (CONTRACT_VERSION stays 4).
    # Check a pair with dsv3.model.ep_comm.check_moe_comm on every rank of the group.
    @hookspec(firstresult=True)
    def dsv3_comm_moe_dispatch(self) -> MoeDispatchOp | None:
        """``moe_dispatch(x (N, D) compute dtype, ids (N, k) int64 global expert ids, weights (N, k) fp32,
        experts_per_rank: int, group) -> (recv_x (M, D) x.dtype, recv_local_ids (M,) int64,
        recv_weights (M,) fp32, handle)``.

        Sends row n once per slot j to rank ``ids[n, j] // experts_per_rank``; ``recv_local_ids`` are
        ids minus ``rank * experts_per_rank``. Any row order, as long as the paired combine undoes it.
        """

    @hookspec(firstresult=True)
    def dsv3_comm_moe_combine(self) -> MoeCombineOp | None:
        """``moe_combine(y (M, D), handle) -> (N, D) y.dtype``: the expert outputs back to their source
        ranks, ``out[n] = sum_j weights[n, j] * y_of(n, j)`` summed over slots j = 0..k-1 in order."""


#: Names of the operator hooks, without the ``dsv3_op_`` prefix, in contract order.
OP_NAMES: tuple[str, ...] = tuple(name[len("dsv3_op_") :] for name in vars(BackendSpec) if name.startswith("dsv3_op_"))
#: Operators that take a weight format (resolved once per format present in the model).
WEIGHT_OPS: tuple[str, ...] = ("linear", "dequantize", "moe_experts")
#: The Protocol each operator hook returns, by operator name (the OpTable's field types).
OP_PROTOCOLS: dict[str, type] = {
    "embedding": EmbeddingOp,
    "rms_norm": RmsNormOp,
    "rotary": RotaryOp,
    "attention": AttentionOp,
    "mla_latent_attention": MlaLatentAttentionOp,
    "paged_cache_write": PagedCacheWriteOp,
    "mla_paged_attention": MlaPagedAttentionOp,
    "linear": LinearOp,
    "dequantize": DequantizeOp,
    "moe_gate": MoeGateOp,
    "moe_experts": MoeExpertsOp,
    "silu_and_mul": SiluAndMulOp,
    "sample": SampleOp,
}
