"""dsv3's cpu_ref against Hugging Face transformers on random tiny checkpoints (float32).

Each case builds a random model with transformers' DeepseekV3ForCausalLM (or DeepseekV2ForCausalLM),
saves it with save_pretrained, loads that directory with ``dsv3.load`` and compares:

- full-sequence logits, both MLA forms (naive and weight-absorbed), the absorbed form both with its
  default naive-form prefill and forced through the latent attention for every token. Tolerance: the largest difference
  must stay under 1e-5 x the largest logit. Both sides compute in float32 (eps 1.2e-7) but in a
  different order (absorbed vs. expanded keys, einsum vs. matmul, index_add order over experts);
  over three layers that drift measures ~1e-6 of the logit scale, so 1e-5 leaves a 10x margin
  while a real mistake (a wrong scale, rotation, routing choice) moves logits by 1e-2 or more.
- greedy continuations against transformers' ``generate(do_sample=False)``: identical tokens.

Prompts are 48 tokens, longer than the YaRN original length (32) of every case, so positions in the
extended range are covered; generation continues past them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import dsv3
from tests.helpers import add_mtp_layer, make_transformers_model, make_transformers_v2_model

CONFIGS = Path(dsv3.__file__).resolve().parent.parent / "configs"
REL_TOL = 1e-5
PROMPT_LEN = 48  # > original_max_position_embeddings (32) in every case
NEW_TOKENS = 12

# name -> (architecture, seed, overrides of tests/helpers.py TINY)
CASES = {
    # q_lora, n_group 2 with the routing bias, 1 shared expert, YaRN 4x over 32, plus an MTP layer on disk
    "v3-base-mtp": ("v3", 0, {}),
    # no q_lora_rank (q_proj), v_head_dim 12 != qk_nope_head_dim 8, 2 shared experts, 4 groups choose 2
    "v3-no-qlora-vdim": (
        "v3",
        1,
        dict(q_lora_rank=None, v_head_dim=12, n_shared_experts=2, n_group=4, topk_group=2),
    ),
    # YaRN 8x with mscale != mscale_all_dim (rotary tables scaled by their ratio), 3 shared experts
    "v3-yarn-mscale": (
        "v3",
        2,
        dict(
            n_shared_experts=3,
            max_position_embeddings=256,
            rope_scaling={
                "type": "yarn",
                "factor": 8.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 0.5,
            },
        ),
    ),
    # every layer MoE, no top-k normalization, scale 1
    "v3-all-moe-unnormalized": (
        "v3",
        3,
        dict(first_k_dense_replace=0, norm_topk_prob=False, routed_scaling_factor=1.0, n_group=4, topk_group=3),
    ),
    # V2-Lite-like: softmax, greedy over all experts, no q_lora, 2 shared experts
    "v2-greedy-no-qlora": ("v2", 4, dict(q_lora_rank=None, n_shared_experts=2, topk_method="greedy")),
    # configs/tiny-v2.yaml as shipped: softmax, group_limited_greedy (best 2 of 4 groups), scale 16, mscale 0.707
    "v2-group-limited-yaml": ("v2", 5, "tiny-v2.yaml"),
}


def _overrides(spec) -> dict:
    if isinstance(spec, str):
        raw = yaml.safe_load((CONFIGS / spec).read_text())
        return {k: v for k, v in raw.items() if k not in ("model_type", "architectures", "scoring_func")}
    return spec


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(name, transformers model, checkpoint directory) for one case, built once per module."""
    arch, seed, spec = CASES[request.param]
    make = make_transformers_model if arch == "v3" else make_transformers_v2_model
    model = make(seed, **_overrides(spec))
    path = tmp_path_factory.mktemp(request.param) / "ckpt"
    model.save_pretrained(path)
    if request.param.endswith("-mtp"):
        add_mtp_layer(path, seed)  # on disk only: transformers ignores it, dsv3 loads it
    return request.param, model, path


def _prompts(seed: int, vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab, (2, PROMPT_LEN), generator=g)  # ids 0/1 are bos/eos
    tokens[:, 0] = 0
    return tokens


@pytest.mark.parametrize("attn_impl", ["absorb", "absorb-latent", "naive"])
def test_logits_match_transformers(case, attn_impl):
    name, ref_model, path = case
    engine = dsv3.load(path, dtype="float32", attn_impl=attn_impl.removesuffix("-latent"), progress=False)
    engine.model.set_naive_prefill(not attn_impl.endswith("-latent"))
    cfg = engine.cfg
    assert cfg.yarn is not None and PROMPT_LEN > cfg.yarn.original_max_position_embeddings
    if cfg.uses_bias:  # the selection-only bias must really be present and non-zero
        biases = [layer.ffn.gate_bias for layer in engine.model.layers if hasattr(layer.ffn, "gate_bias")]
        assert biases and all(float(b.abs().max()) > 0.05 for b in biases)
    if name.endswith("-mtp"):
        assert len(engine.model.mtp) == 1
    tokens = _prompts(7, cfg.vocab_size)
    with torch.no_grad():
        want = ref_model(tokens).logits.float()
    got = engine.logits(tokens)
    assert got.shape == want.shape
    scale = float(want.abs().max())
    err = float((got - want).abs().max())
    assert err <= REL_TOL * scale, f"{name}/{attn_impl}: max |diff| {err:.3g} vs logit scale {scale:.3g}"


@pytest.mark.parametrize("attn_impl", ["absorb", "naive"])
def test_greedy_continuations_match_transformers(case, attn_impl):
    name, ref_model, path = case
    engine = dsv3.load(path, dtype="float32", attn_impl=attn_impl, progress=False)
    tokens = _prompts(11, engine.cfg.vocab_size)
    prompts = [tokens[0].tolist(), tokens[1, : PROMPT_LEN - 9].tolist()]  # two lengths in one dsv3 batch
    got = engine.generate(prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
    for prompt, completion in zip(prompts, got, strict=True):
        with torch.no_grad():
            out = ref_model.generate(
                torch.tensor([prompt]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=1,
                eos_token_id=1,
            )
        want = out[0, len(prompt) :].tolist()
        assert completion.token_ids == want, f"{name}/{attn_impl}"
        assert len(want) == NEW_TOKENS or want[-1] == 1
