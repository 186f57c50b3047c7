"""The DeepSeek-V3 model graph, in paper order: norm/rope -> MLA -> gate/MoE -> block -> MTP -> transformer.

No hardware here: every operator comes from an :class:`~dsv3.registry.OpTable` resolved once
when the model is built. Weight formats ride on each linear (see ``dsv3.weights``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..errors import Dsv3Error
from ..registry import OpTable
from ..weights import FP8_BLOCK, HP, INT8_W8A8, INT8_WO, Weight
from . import fp8_cache
from .cache import LayerCache, ModelCache, PagedLayerCache, page_table
from .config import ModelConfig
from .ep_comm import ExpertParallel
from .fp8_cache import KV_CACHE_DTYPES
from .parallel import ParallelContext, vocab_parallel_embedding
from .rope import cos_sin_table

ATTN_IMPLS = ("absorb", "naive")
#: Rows of the rotary tables a model starts with (1 MB for DeepSeek-V3); they grow when a run goes further.
ROPE_POSITIONS = 4096

#: Storage dtype of each quantized format's data (scales are float32).
_QUANT_DTYPES = {FP8_BLOCK: torch.float8_e4m3fn, INT8_W8A8: torch.int8, INT8_WO: torch.int8}


@dataclass(frozen=True)
class BuildOptions:
    """How a model is instantiated: compute dtype, device, attention form, weight formats.

    fmt_of: maps a module path (e.g. ``layers.3.attn.wq_b``) to the weight format its
        checkpoint tensor has; ``None`` means every linear is high precision.
    parallel: this process's rank and world (``dsv3.model.parallel``); ``None`` is one process holding
        everything. Modules build only this rank's part of each split weight.
    naive_prefill: absorbed form only: a forward of several tokens (a prefill) expands the latents
        through wkv_b and attends in the naive form when that takes fewer multiply-adds (see
        :func:`naive_is_cheaper`); the cache stays latent. False: always the absorbed form.
    page_size: cache positions per page of the absorbed form's paged latent cache (the naive form's
        per-head K/V cache stays contiguous).
    kv_cache_dtype: the absorbed form's latent cache: ``"auto"`` (the compute dtype) or ``"fp8"`` (the
        FP8 layout of :mod:`dsv3.model.fp8_cache`, in the backend's ``BackendInfo.kv_cache_fp8``); set it with
        :meth:`Transformer.set_kv_cache_dtype`, which checks that the backend and the form allow it.
    """

    dtype: torch.dtype = torch.bfloat16
    device: str = "cpu"
    attn_impl: str = "absorb"
    fmt_of: Callable[[str], str] | None = None
    parallel: ParallelContext | None = None
    naive_prefill: bool = True
    page_size: int = 64
    kv_cache_dtype: str = "auto"

    def fmt(self, module_path: str) -> str:
        """The weight format of linear ``module_path`` (high precision without ``fmt_of``)."""
        return HP if self.fmt_of is None else self.fmt_of(module_path)

    @property
    def par(self) -> ParallelContext:
        """This process's rank and world (one process holding everything without ``parallel``)."""
        return self.parallel or ParallelContext()

    @property
    def tp(self) -> ParallelContext:
        """The context of the tensor-parallel parts: :attr:`par`, or one process under ``dp_attention``."""
        return self.par.tp


class Linear(nn.Module):
    """``y = x @ W.T`` for a weight in any format. weight (out, in); scale per format."""

    def __init__(self, in_features: int, out_features: int, ops: OpTable, fmt: str, opts: BuildOptions, experts=0):
        super().__init__()
        shape = (experts, out_features, in_features) if experts else (out_features, in_features)
        self.fmt = fmt
        if fmt == HP:
            self.weight = nn.Parameter(torch.empty(shape, dtype=opts.dtype, device=opts.device))
            self.scale = None
        else:
            self.register_buffer("weight", torch.empty(shape, dtype=_QUANT_DTYPES[fmt], device=opts.device))
            if fmt == FP8_BLOCK:
                sshape = shape[:-2] + (-(-out_features // 128), -(-in_features // 128))
            else:
                sshape = shape[:-1]
            self.register_buffer("scale", torch.empty(sshape, dtype=torch.float32, device=opts.device))
        self.scale_fmt: str | None = None
        self._fn = ops.linear[fmt]

    def as_weight(self) -> Weight:
        return Weight(self.weight, self.fmt, self.scale, 128, self.scale_fmt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x, self.as_weight())


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension; weight (dim,)."""

    def __init__(self, dim: int, eps: float, ops: OpTable, opts: BuildOptions):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim, dtype=opts.dtype, device=opts.device))
        self.eps = eps
        self._fn = ops.rms_norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x, self.weight, self.eps)


def naive_is_cheaper(cfg: ModelConfig, t: int, s: int) -> bool:
    """Whether ``t`` queries over ``s`` latent cache entries take fewer multiply-adds in MLA's naive form.

    Per head, absorbed: ``t*s*(2C + R)`` for scores and values, plus ``t*C*(Dnope + Dv)`` to absorb the
    queries and un-absorb the outputs. Naive from the latent cache: ``t*s*(Dqk + Dv)``, plus
    ``s*C*(Dnope + Dv)`` to expand the keys and values through wkv_b. For a fresh prefill (s = t) the
    naive form wins whenever ``2C + R > Dqk + Dv`` (DeepSeek-V3: 1088 > 320); one decode token over a
    long cache, or a few speculative tokens, stay absorbed.
    """
    expand = cfg.kv_lora_rank * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    absorbed = t * s * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim) + t * expand
    naive = t * s * (cfg.qk_head_dim + cfg.v_head_dim) + s * expand
    return naive < absorbed


class MLA(nn.Module):
    """Multi-head Latent Attention with decoupled (interleaved) RoPE."""

    def __init__(self, cfg: ModelConfig, ops: OpTable, opts: BuildOptions, prefix: str):
        super().__init__()
        self.cfg, self.ops = cfg, ops
        self.par = opts.tp
        self.n_heads = cfg.num_attention_heads // self.par.world_size  # this rank's heads
        self.attn_impl = opts.attn_impl
        self.naive_prefill = opts.naive_prefill
        d, h = cfg.hidden_size, self.n_heads
        if cfg.q_lora_rank:
            self.wq_a = Linear(d, cfg.q_lora_rank, ops, opts.fmt(f"{prefix}.wq_a"), opts)
            self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, ops, opts)
            self.wq_b = Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, ops, opts.fmt(f"{prefix}.wq_b"), opts)
        else:
            self.wq = Linear(d, h * cfg.qk_head_dim, ops, opts.fmt(f"{prefix}.wq"), opts)
        self.wkv_a = Linear(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, ops, opts.fmt(f"{prefix}.wkv_a"), opts)
        self.kv_norm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, ops, opts)
        self.wkv_b = Linear(
            cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), ops, opts.fmt(f"{prefix}.wkv_b"), opts
        )
        self.wo = Linear(h * cfg.v_head_dim, d, ops, opts.fmt(f"{prefix}.wo"), opts)
        self.scale = cfg.softmax_scale
        self._absorbed: torch.Tensor | None = None  # a quantized wkv_b dequantized (H, Dnope + Dv, C)
        self._absorbed_views: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None  # (source, w_uk, w_uv_t)

    def cache_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-token cache entry shapes for this layer's attention form."""
        c = self.cfg
        if self.attn_impl == "naive":
            return {"k": (self.n_heads, c.qk_head_dim), "v": (self.n_heads, c.v_head_dim)}
        return {"kv": (c.kv_lora_rank,), "pe": (c.qk_rope_head_dim,)}

    def absorbed_wkv_b(self) -> torch.Tensor:
        """wkv_b as ``(H, Dnope + Dv, C)`` in the compute dtype; dequantized once for quantized formats."""
        c = self.cfg
        shape = (self.n_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        if self.wkv_b.fmt == HP:
            return self.wkv_b.weight.view(shape)
        if self._absorbed is None:
            dtype = self.kv_norm.weight.dtype
            with torch.no_grad():
                self._absorbed = self.ops.dequantize[self.wkv_b.fmt](self.wkv_b.as_weight(), dtype).view(shape)
        return self._absorbed

    def absorbed_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """wkv_b's key half ``w_uk (H, Dnope, C)`` and value half transposed ``w_uv_t (H, C, Dv)``, head-major
        for ``bmm`` (compute dtype).

        Views of wkv_b (of its dequantized copy when quantized), made once: they see in-place changes
        to the weight, and are made again if the weight tensor is replaced (a load, ``load_state_dict``).
        """
        source = self.wkv_b.weight
        if self._absorbed_views is None or self._absorbed_views[0] is not source:
            self._absorbed = None  # a quantized copy of a replaced weight is stale too
            w = self.absorbed_wkv_b()  # (H, Dnope + Dv, C)
            dn = self.cfg.qk_nope_head_dim
            self._absorbed_views = (source, w[:, :dn], w[:, dn:].transpose(1, 2))
        return self._absorbed_views[1], self._absorbed_views[2]

    def expand_latent(self, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent (B, S, C), k_pe (B, S, R) -> per-head keys (B, S, H, Dqk) and values (B, S, H, Dv)."""
        c = self.cfg
        b, s, _ = latent.shape
        kv = self.wkv_b(latent).view(b, s, self.n_heads, -1)  # (B, S, H, Dnope + Dv)
        k_nope, v = kv.split([c.qk_nope_head_dim, c.v_head_dim], dim=-1)
        k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
        return k, v

    def _absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope (B, T, H, Dnope) -> q_latent (B, T, H, C): each head's query through its key half of wkv_b."""
        b, t = q_nope.shape[:2]
        w_uk, _ = self.absorbed_weights()  # (H, Dnope, C)
        q_heads = q_nope.flatten(0, 1).transpose(0, 1)  # (H, N, Dnope)
        return torch.bmm(q_heads, w_uk).transpose(0, 1).unflatten(0, (b, t))  # (B, T, H, C)

    def _unabsorb(self, o_latent: torch.Tensor) -> torch.Tensor:
        """o_latent (B, T, H, C) -> (N, H * Dv): each head's output through its value half of wkv_b."""
        _, w_uv_t = self.absorbed_weights()  # (H, C, Dv)
        o_heads = o_latent.flatten(0, 1).transpose(0, 1)  # (H, N, C)
        return torch.bmm(o_heads, w_uv_t).transpose(0, 1).flatten(1)  # (N, H * Dv)

    def _paged(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        k_pe: torch.Tensor,
        positions: torch.Tensor,
        cache: PagedLayerCache,
    ) -> torch.Tensor:
        """Write the new latents (N, C), (N, R) into the paged cache, then attend over it -> (N, H * Dv)."""
        c, ops, step = self.cfg, self.ops, cache.step
        b, t = positions.shape
        ops.paged_cache_write(cache.pages, latent, k_pe, step.slot_mapping)
        s = cache.length if cache.length is not None else int(positions.max()) + 1
        if self.naive_prefill and naive_is_cheaper(c, t, s):
            k, v = self.expand_latent(*cache.gather(s))  # (B, S, H, Dqk), (B, S, H, Dv)
            q_full = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, Dqk)
            return ops.attention(q_full, k, v, positions, self.scale).flatten(2).flatten(0, 1)
        q_latent = self._absorb_query(q_nope)  # (B, T, H, C)
        if step.per_token:  # rows whose positions are not their last T: one query per attention row
            q_latent, q_pe = q_latent.reshape(b * t, 1, *q_latent.shape[2:]), q_pe.reshape(b * t, 1, *q_pe.shape[2:])
        o_latent = ops.mla_paged_attention(q_latent, q_pe, cache.pages, step.block_table, step.seq_lens, self.scale)
        return self._unabsorb(o_latent.reshape(b, t, *o_latent.shape[2:]))  # (N, H * Dv)

    def forward(
        self,
        x: torch.Tensor,
        positions: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        cache: LayerCache | PagedLayerCache | None,
    ) -> torch.Tensor:
        """x (B, T, D), positions (B, T), cos/sin (B, T, R/2) -> (B, T, D)."""
        c, ops = self.cfg, self.ops
        b, t, d = x.shape
        h, r = self.n_heads, c.qk_rope_head_dim
        x = x.flatten(0, 1)  # (N, D): the linears see a plain matrix (flatten, not view(b*t): traceable)
        q = self.wq_b(self.q_norm(self.wq_a(x))) if c.q_lora_rank else self.wq(x)  # (N, H*Dqk)
        q = q.view(b, t, h, c.qk_head_dim)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, r], dim=-1)  # (B, T, H, Dnope), (B, T, H, R)
        latent, k_pe = self.wkv_a(x).split([c.kv_lora_rank, r], dim=-1)  # (N, C), (N, R)
        latent = self.kv_norm(latent)  # (N, C)
        # the queries' rotary parts and the key's, rotated in one call: (B, T, H + 1, R)
        roped = ops.rotary(torch.cat([q_pe, k_pe.view(b, t, 1, r)], dim=2), cos, sin)
        q_pe, k_pe = roped[:, :, :h], roped[:, :, h]  # (B, T, H, R), (B, T, R)

        if self.attn_impl == "naive":
            k, v = self.expand_latent(latent.view(b, t, -1), k_pe)
            kv_all = {"k": k, "v": v} if cache is None else cache.write_and_read({"k": k, "v": v}, positions)
            q_full = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, Dqk)
            out = ops.attention(q_full, kv_all["k"], kv_all["v"], positions, self.scale).flatten(2)  # (B, T, H*Dv)
        elif cache is not None and cache.paged:
            out = self._paged(q_nope, q_pe, latent, k_pe.flatten(0, 1), positions, cache)  # (N, H*Dv)
        else:  # no cache (a full-sequence forward), or a contiguous one (the ONNX export's)
            lat_all = {"kv": latent.view(b, t, -1), "pe": k_pe}
            if cache is not None:
                lat_all = cache.write_and_read(lat_all, positions)  # (B, S, C), (B, S, R)
            if self.naive_prefill and naive_is_cheaper(c, t, lat_all["kv"].shape[1]):
                k, v = self.expand_latent(lat_all["kv"], lat_all["pe"])  # (B, S, H, Dqk), (B, S, H, Dv)
                q_full = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, Dqk)
                out = ops.attention(q_full, k, v, positions, self.scale).flatten(2)  # (B, T, H*Dv)
            else:
                o_latent = ops.mla_latent_attention(
                    self._absorb_query(q_nope), q_pe, lat_all["kv"], lat_all["pe"], positions, self.scale
                )  # (B, T, H, C)
                out = self._unabsorb(o_latent)  # (N, H*Dv)
        y = self.wo(out.flatten(0, -2))  # (N, D)
        return self.par.all_reduce_(y).view(b, t, d)  # (B, T, D), summed over ranks' heads


class MLP(nn.Module):
    """Gated feed-forward ``w2(silu(w1 x) * w3 x)``: dense layers and shared experts.

    Under tensor parallelism each rank holds ``inter / ws`` channels; ``reduce=False`` leaves the
    partial sum for the caller to all-reduce (the MoE sums it with its routed experts).
    """

    def __init__(self, dim: int, inter: int, ops: OpTable, opts: BuildOptions, prefix: str, reduce: bool = True):
        super().__init__()
        self.par = opts.tp
        self.reduce = reduce
        inter = inter // self.par.world_size
        self.w1 = Linear(dim, inter, ops, opts.fmt(f"{prefix}.w1"), opts)
        self.w3 = Linear(dim, inter, ops, opts.fmt(f"{prefix}.w3"), opts)
        self.w2 = Linear(inter, dim, ops, opts.fmt(f"{prefix}.w2"), opts)
        self._act = ops.silu_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.w2(self._act(self.w1(x), self.w3(x)))
        return self.par.all_reduce_(y) if self.reduce else y


class MoE(nn.Module):
    """DeepSeekMoE: shared experts plus top-k routed experts.

    Routed experts are stacked: w1/w3 ``(E_local, I, D)``, w2 ``(E_local, D, I)``; this module holds
    experts ``[expert_offset, expert_offset + E_local)`` (all of them on one device). Under tensor
    parallelism every rank runs its experts for all tokens and one all-reduce sums them; under
    ``dp_attention`` (:meth:`attach_ep`) each rank's own tokens go to their experts' ranks and back
    (``dsv3.model.ep_comm``), and the shared experts are replicated.
    """

    def __init__(self, cfg: ModelConfig, ops: OpTable, opts: BuildOptions, prefix: str):
        super().__init__()
        self.routing = cfg.routing
        self.par = opts.par
        d, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
        self.gate_weight = nn.Parameter(torch.empty(e, d, dtype=torch.float32, device=opts.device))
        if self.routing.has_bias:
            self.register_buffer("gate_bias", torch.zeros(e, dtype=torch.float32, device=opts.device))
        else:
            self.gate_bias = None
        self.expert_offset, e_local = self.par.local(e)[0], e // self.par.world_size  # expert parallelism
        self.w1 = Linear(d, i, ops, opts.fmt(f"{prefix}.w1"), opts, experts=e_local)
        self.w3 = Linear(d, i, ops, opts.fmt(f"{prefix}.w3"), opts, experts=e_local)
        self.w2 = Linear(i, d, ops, opts.fmt(f"{prefix}.w2"), opts, experts=e_local)
        shared = cfg.n_shared_experts * i
        self.shared = MLP(d, shared, ops, opts, f"{prefix}.shared", reduce=False) if cfg.n_shared_experts else None
        self._gate = ops.moe_gate
        self._experts = ops.moe_experts[self.w1.fmt]
        self.load: torch.Tensor | None = None  # set to zeros (E,) to count tokens per expert
        self.last_ids: torch.Tensor | None = None
        self._ep: ExpertParallel | None = None
        self._code = -1
        self._e_local, self._dim, self._dtype = e_local, d, opts.dtype

    def _count(self, ids: torch.Tensor) -> None:
        """Add ids (N, k)'s tokens per expert to ``load`` when counting."""
        if self.load is not None:
            self.load += torch.bincount(ids.flatten(), minlength=self.load.numel()).to(self.load)

    def attach_ep(self, ep: ExpertParallel, code: int) -> None:
        """Dispatch tokens to their experts' ranks through ``ep`` (--dp-attention), as MoE layer ``code``."""
        self._ep, self._code = ep, code
        ep.layers[code] = self._ep_forward

    def _ep_forward(self, flat: torch.Tensor | None) -> torch.Tensor:
        """This rank's tokens flat (N, D) (None: none, N = 0) -> (N, D): gate, dispatch each (token,
        expert) pair to the expert's rank, run the local experts on the rows received, combine.

        Each token's top-k are put in ascending expert order first, and each received row goes through
        its one expert with weight 1.0 (the combine applies the real weights, slots in order): in float32
        the sum is the single-process op's, which adds the experts in ascending order, bit for bit.
        """
        device = self.gate_weight.device
        if flat is None:
            flat = torch.empty((0, self._dim), dtype=self._dtype, device=device)
        if flat.shape[0]:
            weights, ids = self._gate(flat, self.gate_weight, self.gate_bias, self.routing)  # (N, k)
            self._count(ids)
            ids, order = ids.sort(dim=-1)
            weights = weights.gather(1, order)
        else:  # no tokens: ops are not asked to handle empty batches
            k = self.routing.top_k
            ids = torch.empty((0, k), dtype=torch.int64, device=device)
            weights = torch.empty((0, k), dtype=torch.float32, device=device)
        ep = self._ep
        recv_x, recv_ids, _recv_w, handle = ep.dispatch(flat, ids, weights, self._e_local, ep.group)  # (M, D), (M,)
        if recv_x.shape[0]:
            ones = torch.ones((recv_x.shape[0], 1), dtype=torch.float32, device=recv_x.device)
            local_ids = recv_ids.to(torch.int64).view(-1, 1)  # (M, 1): this rank's expert index
            w1, w3, w2 = self.w1.as_weight(), self.w3.as_weight(), self.w2.as_weight()
            y = self._experts(recv_x, ones, local_ids, w1, w3, w2, 0)  # (M, D)
        else:
            y = recv_x
        routed = ep.combine(y, handle)  # (N, D)
        if self.shared is not None and flat.shape[0]:
            routed = routed + self.shared(flat)  # replicated shared experts: no communication
        return routed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, D) -> (B, T, D)."""
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        if self._ep is not None:
            return self._ep.run(self._code, flat).view_as(x)
        weights, ids = self._gate(flat, self.gate_weight, self.gate_bias, self.routing)  # (N, k)
        self._count(ids)
        routed = self._experts(
            flat, weights, ids, self.w1.as_weight(), self.w3.as_weight(), self.w2.as_weight(), self.expert_offset
        )
        if self.shared is not None:
            routed = routed + self.shared(flat)
        return self.par.all_reduce_(routed).view_as(x)  # one all-reduce: this rank's experts + its shared-expert part


class Block(nn.Module):
    """Pre-norm decoder layer: ``h = x + attn(norm(x)); out = h + ffn(norm(h))``."""

    def __init__(self, layer: int, cfg: ModelConfig, ops: OpTable, opts: BuildOptions, prefix: str | None = None):
        super().__init__()
        prefix = prefix or f"layers.{layer}"
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, opts)
        self.attn = MLA(cfg, ops, opts, f"{prefix}.attn")
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, ops, opts)
        if cfg.is_moe_layer(layer):
            self.ffn = MoE(cfg, ops, opts, f"{prefix}.ffn")
        else:
            self.ffn = MLP(cfg.hidden_size, cfg.intermediate_size, ops, opts, f"{prefix}.ffn")

    def forward(self, x, positions, cos, sin, cache: LayerCache | None) -> torch.Tensor:
        h = x + self.attn(self.attn_norm(x), positions, cos, sin, cache)
        return h + self.ffn(self.ffn_norm(h))


class MTPLayer(nn.Module):
    """One multi-token-prediction module: predicts token t+2 from the hidden state at t and token t+1.

    ``h' = block(eh_proj(concat(enorm(embed(next_token)), hnorm(h))))``; logits = head(norm(h')).
    """

    def __init__(self, index: int, cfg: ModelConfig, ops: OpTable, opts: BuildOptions):
        super().__init__()
        prefix = f"mtp.{index}"
        d = cfg.hidden_size
        self.par = opts.tp
        v = cfg.vocab_size // self.par.world_size  # vocab-parallel embedding and head
        self.embed = nn.Parameter(torch.empty(v, d, dtype=opts.dtype, device=opts.device))
        self.enorm = RMSNorm(d, cfg.rms_norm_eps, ops, opts)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps, ops, opts)
        self.eh_proj = Linear(2 * d, d, ops, opts.fmt(f"{prefix}.eh_proj"), opts)
        # the MTP layer sits after the main layers, so it is a MoE layer when they are
        self.block = Block(cfg.num_hidden_layers + index, cfg, ops, opts, prefix=f"{prefix}.block")
        self.norm = RMSNorm(d, cfg.rms_norm_eps, ops, opts)
        self.head = Linear(d, v, ops, HP, opts)
        self._embedding = ops.embedding

    def forward(self, hidden, next_tokens, positions, cos, sin, cache: LayerCache | None) -> torch.Tensor:
        """hidden (B, T, D), next_tokens (B, T) -> new hidden (B, T, D) (before the final norm)."""
        e = self.enorm(vocab_parallel_embedding(self._embedding, next_tokens, self.embed, self.par))
        h = self.eh_proj(torch.cat([e, self.hnorm(hidden)], dim=-1))  # (B, T, D)
        return self.block(h, positions, cos, sin, cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> (..., V) float32 (gathered from every rank's vocabulary part)."""
        return self.par.all_gather_last(self.head(self.norm(hidden)).float())


class Transformer(nn.Module):
    """The whole model. ``forward`` returns the final hidden states (after the last norm)."""

    def __init__(self, cfg: ModelConfig, ops: OpTable, opts: BuildOptions):
        super().__init__()
        self.cfg, self.ops, self.opts = cfg, ops, opts
        d = cfg.hidden_size
        self.par = opts.tp
        v = cfg.vocab_size // self.par.world_size  # vocab-parallel embedding and head
        self.embed = nn.Parameter(torch.empty(v, d, dtype=opts.dtype, device=opts.device))
        self.layers = nn.ModuleList(Block(i, cfg, ops, opts) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(d, cfg.rms_norm_eps, ops, opts)
        self.head = Linear(d, v, ops, HP, opts)
        self.mtp = nn.ModuleList(MTPLayer(j, cfg, ops, opts) for j in range(cfg.num_nextn_predict_layers))
        # built for what a run needs, not for the config's maximum: see extend_rope
        cos, sin = cos_sin_table(cfg, min(cfg.max_position_embeddings, ROPE_POSITIONS))
        table_device = "cpu" if str(opts.device) == "meta" else opts.device  # the loader moves it later
        self.register_buffer("rope_cos", cos.to(table_device), persistent=False)  # (P, R/2)
        self.register_buffer("rope_sin", sin.to(table_device), persistent=False)
        self._embedding = ops.embedding
        # --dp-attention: the MoE layers' all-to-all and the agreement that keeps ranks in step
        self.ep: ExpertParallel | None = None
        if opts.par.expert_parallel:
            p = opts.par
            self.ep = ExpertParallel(p.rank, p.world_size, p.group, p.device)
            blocks = [*self.layers, *(m.block for m in self.mtp)]  # codes: layer index, MTP layers after the main
            for code, block in enumerate(blocks):
                if isinstance(block.ffn, MoE):
                    block.ffn.attach_ep(self.ep, code)

    def prepare_layouts(self) -> None:
        """Lay out, once, the weights the decode step reads in another shape than stored: each MLA's
        head-major absorbed ``wkv_b`` halves (dequantized when quantized). Called at the end of a load;
        without it they are made at the first forward that needs them."""
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, MLA) and module.attn_impl == "absorb":
                    module.absorbed_weights()

    def set_naive_prefill(self, on: bool) -> None:
        """Let multi-token forwards of the absorbed form attend in the naive form when cheaper (default on)."""
        self.opts = replace(self.opts, naive_prefill=on)
        for module in self.modules():
            if isinstance(module, MLA):
                module.naive_prefill = on

    # ------------------------------------------------------------ caches
    def set_kv_cache_dtype(self, kv_cache_dtype: str) -> None:
        """Make ``new_cache`` allocate ``kv_cache_dtype`` latent caches (``BuildOptions.kv_cache_dtype``).

        ``"fp8"`` needs the absorbed form and a backend listing an fp8 dtype in ``BackendInfo.kv_cache_fp8``;
        otherwise a Dsv3Error naming the backend (or the form) and ``--kv-cache-dtype``.
        """
        self.cache_storage_dtype(kv_cache_dtype)  # checks
        self.opts = replace(self.opts, kv_cache_dtype=kv_cache_dtype)

    def cache_storage_dtype(self, kv_cache_dtype: str | None = None) -> torch.dtype:
        """The dtype of the absorbed form's latent cache tensors for ``kv_cache_dtype`` (default the build's):
        the compute dtype for ``"auto"``, the backend's first ``BackendInfo.kv_cache_fp8`` dtype for ``"fp8"``."""
        kind = self.opts.kv_cache_dtype if kv_cache_dtype is None else kv_cache_dtype
        if kind not in KV_CACHE_DTYPES:
            raise Dsv3Error(f"unknown --kv-cache-dtype {kind!r}; choose one of {', '.join(KV_CACHE_DTYPES)}")
        if kind == "auto":
            return self.embed.dtype
        if self.opts.attn_impl == "naive":
            raise Dsv3Error(
                "--kv-cache-dtype fp8 needs the absorbed MLA form (--attn-impl absorb): the naive form keeps "
                "per-head K/V in the compute dtype"
            )
        info = getattr(self, "backend_info", None)  # set by dsv3.runtime.loading.build_model
        fp8 = tuple(info.kv_cache_fp8) if info is not None else ()
        if not fp8:
            raise Dsv3Error(
                f"--kv-cache-dtype fp8: backend {self.ops.backend} has no fp8 latent cache "
                "(BackendInfo.kv_cache_fp8 is empty); use --kv-cache-dtype auto"
            )
        fp8_cache.entry_bytes(self.cfg.kv_lora_rank, self.cfg.qk_rope_head_dim, self.embed.dtype)  # C % 4 check
        return fp8[0]

    def new_cache(
        self,
        max_batch: int,
        max_len: int,
        page_size: int | None = None,
        page_seed: int = 0,
        num_pages: int | None = None,
        kv_cache_dtype: str | None = None,
    ) -> ModelCache:
        """Allocate caches for ``max_batch`` rows of ``max_len`` positions (zeros, compute dtype; the
        absorbed form's in the fp8 layout of :mod:`dsv3.model.fp8_cache` with ``kv_cache_dtype`` ``"fp8"``,
        default ``BuildOptions.kv_cache_dtype``).

        The absorbed form's are paged (page_size default BuildOptions.page_size). Without ``num_pages``
        each row owns ``ceil(max_len / page_size)`` pages drawn from a pool shuffled with ``page_seed``.
        With ``num_pages`` the layers get that many pages and the block table starts empty (all
        zeros): the caller hands rows their pages with :meth:`set_pages` before writing to them (the
        server's page pool). The naive form's per-head K/V strips are contiguous ``(max_batch, max_len, H, ...)``
        (``num_pages`` does not apply).
        """
        dev, dt = self.embed.device, self.embed.dtype
        store = self.cache_storage_dtype(kv_cache_dtype)  # dt, or an fp8 dtype (absorbed form only)
        page_size = self.opts.page_size if page_size is None else page_size
        if page_size < 1:
            raise Dsv3Error(f"page_size {page_size} must be at least 1")
        if num_pages is not None and num_pages < 1:
            raise Dsv3Error(f"num_pages {num_pages} must be at least 1")
        paged = self.opts.attn_impl != "naive"
        table = None
        if paged and num_pages is None:
            table = page_table(max_batch, max_len, page_size, page_seed, dev)
            num_pages = table.numel()
        elif paged:
            table = torch.zeros((max_batch, -(-max_len // page_size)), dtype=torch.int32, device=dev)

        def alloc(attn: MLA):
            shapes = attn.cache_shapes()
            if paged:
                c, r = shapes["kv"][0], shapes["pe"][0]
                width = c + r if store == dt else fp8_cache.entry_bytes(c, r, dt)  # values, or bytes (fp8)
                return PagedLayerCache(torch.zeros((num_pages, page_size, width), dtype=store, device=dev), c, dtype=dt)
            return LayerCache(
                {k: torch.zeros((max_batch, max_len, *s), dtype=dt, device=dev) for k, s in shapes.items()}
            )

        main, mtp = [alloc(layer.attn) for layer in self.layers], [alloc(m.block.attn) for m in self.mtp]
        return ModelCache(main, mtp, max_batch, max_len, table, page_size if paged else 0)

    def copy_page(self, cache: ModelCache, src: int, dst: int) -> None:
        """``ModelCache.copy_page``, as a model call (mirrored to every rank under tensor parallelism)."""
        cache.copy_page(src, dst)

    def set_pages(self, cache: ModelCache, row: int, first: int, pages: list[int]) -> None:
        """Cache row ``row``'s positions from ``first * page_size`` on live in ``pages`` (see
        ``ModelCache.set_pages``); a model call so that tensor-parallel serving mirrors it to every rank."""
        cache.set_pages(row, first, pages)

    def rope(self, positions: torch.Tensor, length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, T, R/2).

        length: the largest position + 1 when the caller knows it (else it is read from positions).
        """
        if positions.numel():
            self.extend_rope(int(positions.max()) + 1 if length is None else length)
        return self.rope_cos[positions], self.rope_sin[positions]

    def extend_rope(self, length: int) -> None:
        """Make the rotary tables cover positions ``0..length-1``, growing in powers of two.

        The tables start at ``ROPE_POSITIONS`` rows at most: built for max_position_embeddings up front,
        a config saying 10**9 positions would take 32 GB before a token is seen. Each position's row is
        the same whatever the table's length (the angles are position x frequency).
        """
        have, limit = self.rope_cos.shape[0], self.cfg.max_position_embeddings
        if length <= have:
            return
        if length > limit:
            raise Dsv3Error(f"position {length - 1} is past the model's {limit} positions (max_position_embeddings)")
        with torch.inference_mode(False), torch.no_grad():  # ordinary tensors, usable in training too
            cos, sin = cos_sin_table(self.cfg, min(limit, 1 << (length - 1).bit_length()))
        self.rope_cos, self.rope_sin = cos.to(self.rope_cos.device), sin.to(self.rope_sin.device)

    # ------------------------------------------------------------ forward
    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: ModelCache | None = None,
        rows: torch.Tensor | None = None,
        length: int | None = None,
    ) -> torch.Tensor:
        """tokens (B, T) int64, positions (B, T) -> hidden (B, T, D) after the final norm.

        Without a cache, positions must be ``0..T-1`` in every row (a full-sequence forward).
        rows (B,) int64: the cache rows (slots) batch rows use; None: cache rows 0..B-1.
        length: ``max(positions) + 1`` when the caller knows it on the host (a decode loop does): the
            forward then reads nothing back from the device. None: read from positions (one sync).
        """
        b, t = tokens.shape
        if positions is None:
            positions = torch.arange(t, device=tokens.device).expand(b, t)
            length = t
        elif length is None:  # the max position + 1, read once per forward, not once per layer (a device sync)
            length = int(positions.max()) + 1 if positions.numel() else t
        if cache is not None:
            cache = cache.view(rows, length, positions)
        cos, sin = self.rope(positions, length)
        x = vocab_parallel_embedding(self._embedding, tokens, self.embed, self.par)  # (B, T, D)
        for i, layer in enumerate(self.layers):
            x = layer(x, positions, cos, sin, None if cache is None else cache.main[i])
        return self.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (..., D) -> (..., V) float32 (gathered from every rank's vocabulary part)."""
        return self.par.all_gather_last(self.head(hidden).float())

    def mtp_forward(
        self,
        depth: int,
        hidden: torch.Tensor,
        next_tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: ModelCache | None = None,
        rows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run MTP module ``depth`` on hidden (B, T, D) and the following tokens (B, T) -> hidden (B, T, D).

        rows (B,) int64: the cache rows (slots) batch rows use; None: cache rows 0..B-1.
        """
        length = int(positions.max()) + 1 if positions.numel() else 0
        cos, sin = self.rope(positions, length)
        layer_cache = None if cache is None else cache.view(rows, length, positions).mtp[depth]
        return self.mtp[depth](hidden, next_tokens, positions, cos, sin, layer_cache)
