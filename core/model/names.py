"""Checkpoint tensor names: the Hugging Face name of each module's weight (the released layout)."""

from __future__ import annotations

import re

from .config import ModelConfig

_ATTN = {
    "wq_a": "q_a_proj",
    "q_norm": "q_a_layernorm",
    "wq_b": "q_b_proj",
    "wq": "q_proj",
    "wkv_a": "kv_a_proj_with_mqa",
    "kv_norm": "kv_a_layernorm",
    "wkv_b": "kv_b_proj",
    "wo": "o_proj",
}


_MLP = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _suffix(leaf: str, quant_suffix: str) -> str:
    return quant_suffix if leaf == "scale" else leaf


def _block_name(rest: str, quant_suffix: str) -> str | None:
    """Map a decoder-layer-relative name (``attn.wq_a.weight``) to the HF one (``self_attn.q_a_proj.weight``)."""
    if rest == "attn_norm.weight":
        return "input_layernorm.weight"
    if rest == "ffn_norm.weight":
        return "post_attention_layernorm.weight"
    if rest == "ffn.gate_weight":
        return "mlp.gate.weight"
    if rest == "ffn.gate_bias":
        return "mlp.gate.e_score_correction_bias"
    parts = rest.split(".")
    if parts[0] == "attn" and len(parts) == 3 and parts[1] in _ATTN:
        return f"self_attn.{_ATTN[parts[1]]}.{_suffix(parts[2], quant_suffix)}"
    if parts[0] == "ffn" and len(parts) == 4 and parts[1] == "shared" and parts[2] in _MLP:
        return f"mlp.shared_experts.{_MLP[parts[2]]}.{_suffix(parts[3], quant_suffix)}"
    if parts[0] == "ffn" and len(parts) == 3 and parts[1] in _MLP:
        return f"mlp.{_MLP[parts[1]]}.{_suffix(parts[2], quant_suffix)}"
    return None


def hf_name(name: str, cfg: ModelConfig, quant_suffix: str = "weight_scale_inv") -> str:
    """The checkpoint name of one of the model's tensors.

    Routed experts come back with an ``{e}`` placeholder: ``model.layers.3.mlp.experts.{e}.gate_proj.weight``.
    """
    if name == "embed":
        return "model.embed_tokens.weight"
    if name == "norm.weight":
        return "model.norm.weight"
    if name == "head.weight":
        return "lm_head.weight"
    m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
    if m:
        base, rest = f"model.layers.{m.group(1)}.", m.group(2)
    else:
        m = re.fullmatch(r"mtp\.(\d+)\.(.+)", name)
        if not m:
            raise KeyError(name)
        base, rest = f"model.layers.{cfg.num_hidden_layers + int(m.group(1))}.", m.group(2)
        mtp_own = {
            "embed": "embed_tokens.weight",
            "enorm.weight": "enorm.weight",
            "hnorm.weight": "hnorm.weight",
            "norm.weight": "shared_head.norm.weight",
            "head.weight": "shared_head.head.weight",
        }
        if rest in mtp_own:
            return base + mtp_own[rest]
        if rest.startswith("eh_proj."):
            return base + "eh_proj." + _suffix(rest.split(".")[1], quant_suffix)
        if not rest.startswith("block."):
            raise KeyError(name)
        rest = rest[len("block.") :]
    em = re.fullmatch(r"ffn\.(w[123])\.(weight|scale)", rest)
    if em and _is_moe(rest, base, cfg):
        return base + f"mlp.experts.{{e}}.{_MLP[em.group(1)]}.{_suffix(em.group(2), quant_suffix)}"
    mapped = _block_name(rest, quant_suffix)
    if mapped is None:
        raise KeyError(name)
    return base + mapped


def _is_moe(rest: str, base: str, cfg: ModelConfig) -> bool:
    layer = int(base.split(".")[2])
    return cfg.is_moe_layer(layer)
