"""Which checkpoint tensors ``dsv3 convert`` quantizes, and how --max-shard-size is read."""

from __future__ import annotations

import pytest

from dsv3.errors import Dsv3Error
from dsv3.tools.convert import is_quantized_projection, parse_size


@pytest.mark.parametrize(
    "name",
    [
        "model.layers.0.self_attn.q_a_proj.weight",
        "model.layers.0.self_attn.q_b_proj.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.0.self_attn.kv_b_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.3.mlp.experts.17.down_proj.weight",
        "model.layers.3.mlp.shared_experts.up_proj.weight",
        "model.layers.61.self_attn.kv_b_proj.weight",  # the MTP layer's decoder block
    ],
)
def test_projections_are_quantized(name):
    assert is_quantized_projection(name)


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens.weight",
        "lm_head.weight",
        "model.norm.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.self_attn.q_a_layernorm.weight",
        "model.layers.0.self_attn.kv_a_layernorm.weight",
        "model.layers.3.mlp.gate.weight",  # the router gate
        "model.layers.3.mlp.gate.e_score_correction_bias",
        "model.layers.61.eh_proj.weight",  # BF16 in the release
        "model.layers.61.shared_head.head.weight",
        "model.layers.61.embed_tokens.weight",
        "model.layers.0.self_attn.q_a_proj.weight_scale_inv",
    ],
)
def test_everything_else_stays_high_precision(name):
    assert not is_quantized_projection(name)


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5kb") == 1500
    assert parse_size("1000") == 1000
    assert parse_size(42) == 42
    for bad in ("five", "5XB", "0", "-1GB"):
        with pytest.raises(Dsv3Error, match="max-shard-size"):
            parse_size(bad)
