"""The configs shipped in dsv3.configs: every one loads and validates, the published shapes add up to
the published parameter counts, and ``dsv3 run --config X.yaml`` uses the given config."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import subprocess
import sys
from importlib.resources import files
from pathlib import Path

import pytest
import yaml

import dsv3
from dsv3.cli import main as dsv3_main
from dsv3.model.config import builtin_config
from dsv3.model.graph import naive_is_cheaper
from dsv3.runtime.loading import build_model
from tests.helpers import TINY, add_tiny_tokenizer, make_checkpoint

SHIPPED = sorted(p.name for p in files("dsv3.configs").iterdir() if p.name.endswith((".json", ".yaml", ".yml")))

# name -> (total parameters of the main model, active per token, MTP parameters), as published:
# V3 671B total / 37B active (+14B MTP), V2 236B / 21B, V2-Lite 15.7B.
PUBLISHED = {
    "deepseek-v3-671b": (671e9, 37e9, 14e9),
    "deepseek-v2-236b": (236e9, 21e9, 0),
    "deepseek-v2-lite-16b": (15.7e9, None, 0),
}


def test_the_expected_configs_ship():
    stems = {Path(n).stem for n in SHIPPED}
    assert {"deepseek-v3-671b", "deepseek-v2-236b", "deepseek-v2-lite-16b", "tiny-v3", "tiny-v2"} <= stems


@pytest.mark.parametrize("name", SHIPPED)
def test_every_shipped_config_loads_and_validates(name):
    path = builtin_config(Path(name).stem)
    assert path.name == name
    cfg = dsv3.load_config(path)
    assert cfg.validate() is cfg
    assert cfg.model_type in ("deepseek_v2", "deepseek_v3")
    if not name.startswith("bench-mid"):  # bench-mid: issue 22's timing shapes (profile_decode.py's MID), no YaRN
        assert cfg.yarn is not None and cfg.yarn.factor > 1
    raw = json.loads(path.read_text()) if name.endswith(".json") else yaml.safe_load(path.read_text())
    for key in ("hidden_size", "num_hidden_layers", "n_routed_experts", "num_experts_per_tok", "kv_lora_rank"):
        assert getattr(cfg, key) == raw[key], key  # nothing silently replaced by a default
    assert cfg.q_lora_rank == (raw["q_lora_rank"] or None)


def _params(model) -> tuple[int, int, int]:
    """(main-model parameters, active per token, MTP parameters) of a model built on the meta device."""
    cfg = model.cfg
    mtp = sum(p.numel() for p in model.mtp.parameters())
    total = sum(p.numel() for p in model.parameters()) - mtp
    inactive = 0
    for layer in model.layers:
        if cfg.is_moe_layer(list(model.layers).index(layer)):
            per_expert = sum(lin.weight[0].numel() for lin in (layer.ffn.w1, layer.ffn.w2, layer.ffn.w3))
            inactive += per_expert * (cfg.n_routed_experts - cfg.num_experts_per_tok)
    return total, total - inactive, mtp


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_shapes_give_the_published_sizes(name):
    cfg = dsv3.load_config(builtin_config(name))
    model = build_model(cfg, dtype="bfloat16", device="meta")  # shapes only, no memory
    total, active, mtp = _params(model)
    want_total, want_active, want_mtp = PUBLISHED[name]
    assert abs(total - want_total) / want_total < 0.005, total
    if want_active is not None:
        assert abs(active - want_active) / want_active < 0.03, active
    assert abs(mtp - want_mtp) <= 0.05 * max(want_mtp, 1), mtp
    # the absorbed MLA cache holds kv_lora_rank + qk_rope_head_dim = 576 values per token per layer,
    # the naive one 128 heads x (192 + 128) = 40960 for the 128-head models
    shapes = model.layers[0].attn.cache_shapes()
    assert sum(math.prod(s) for s in shapes.values()) == 576
    naive = build_model(
        dataclasses.replace(cfg, num_hidden_layers=1, num_nextn_predict_layers=0),
        attn_impl="naive",
        dtype="bfloat16",
        device="meta",
    )
    per_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    assert sum(math.prod(s) for s in naive.layers[0].attn.cache_shapes().values()) == cfg.num_attention_heads * per_head


def test_v3_671b_facts():
    cfg = dsv3.load_config(builtin_config("deepseek-v3-671b"))
    r = cfg.routing
    want = dict(scoring="sigmoid", n_group=8, topk_group=4, top_k=8, has_bias=True, norm_topk_prob=True, scale=2.5)
    assert {k: getattr(r, k) for k in want} == want
    assert cfg.quantization.quant_method == "fp8" and tuple(cfg.quantization.weight_block_size) == (128, 128)
    m = 0.1 * 1.0 * math.log(40) + 1
    assert cfg.softmax_scale == pytest.approx(192**-0.5 * m * m)
    assert cfg.num_nextn_predict_layers == 1 and cfg.eos_ids == (1,)
    assert "_note" in cfg.extra  # unknown keys are kept, not rejected


def test_v3_671b_prefill_form_choices():
    """Per head, absorbed costs t*s*1088 + t*131072 multiply-adds, naive t*s*320 + s*131072 (C 512, R 64)."""
    cfg = dsv3.load_config(builtin_config("deepseek-v3-671b"))
    assert naive_is_cheaper(cfg, 2, 2) and naive_is_cheaper(cfg, 4096, 4096)  # fresh prefills
    assert naive_is_cheaper(cfg, 512, 8192)  # a 512-token chunk onto 7680 cached tokens
    assert not naive_is_cheaper(cfg, 1, 4096) and not naive_is_cheaper(cfg, 3, 4096)  # decode, MTP verify
    assert not naive_is_cheaper(cfg, 100, 8192) and naive_is_cheaper(cfg, 200, 8192)  # the break-even: ~171


def test_v2_facts():
    big = dsv3.load_config(builtin_config("deepseek-v2-236b")).routing
    want = dict(scoring="softmax", n_group=8, topk_group=3, top_k=6, has_bias=False, norm_topk_prob=False, scale=16.0)
    assert {k: getattr(big, k) for k in want} == want
    lite = dsv3.load_config(builtin_config("deepseek-v2-lite-16b"))
    assert lite.q_lora_rank is None and lite.routing.n_group == 1 and lite.topk_method == "greedy"
    assert lite.n_shared_experts == 2 and lite.yarn.mscale == lite.yarn.mscale_all_dim == 0.707


def test_tiny_v3_yaml_is_the_test_helpers_shape(tmp_path):
    """configs/tiny-v3.yaml describes exactly the checkpoints tests/helpers.py makes."""
    shipped = dsv3.load_config(builtin_config("tiny-v3"))
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=0)
    saved = dsv3.load_config(ckpt)
    assert dataclasses.replace(saved, source="") == dataclasses.replace(shipped, source="")
    assert shipped.vocab_size == TINY["vocab_size"]


def _run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dsv3", *args], capture_output=True, text=True, input=stdin, env=env, timeout=300
    )


def test_run_with_config_yaml_instead_of_config_json(tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=3)
    add_tiny_tokenizer(ckpt)
    (ckpt / "config.json").unlink()  # only the --config file can describe this model now
    common = ["run", "--ckpt-path", str(ckpt), "--prompt", "the cat sat", "--max-new-tokens", "5"]
    common += ["--temperature", "0", "--dtype", "float32", "--output-format", "jsonl"]

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert dsv3_main(common) == 2
    assert "config.json" in err.getvalue() and err.getvalue().count("\n") == 1

    yaml_cfg = str(builtin_config("tiny-v3"))
    proc = _run(*common, "--config", yaml_cfg)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(records) == 1 and len(records[0]["token_ids"]) == 5
    engine = dsv3.load(ckpt, dtype="float32", config=yaml_cfg, progress=False)
    want = engine.generate(["the cat sat"], max_new_tokens=5, temperature=0.0)[0]
    assert records[0]["token_ids"] == want.token_ids
