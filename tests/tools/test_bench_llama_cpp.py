"""``dsv3 bench --against llama.cpp``, the bandwidth floor and the random bench configs.

Without llama.cpp: the one-line errors when llama-cpp-python or its converter is missing, the bench configs'
shapes against the published 671B config, the random checkpoint writer, the touched-bytes arithmetic, and the
interleaving / ratio / floor arithmetic with a fake llama.cpp peer. With llama-cpp-python installed and
``$DSV3_LLAMA_CPP_SRC`` pointing at llama.cpp's sources (the converter): a real conversion and the same greedy
tokens as dsv3 (skipped otherwise, saying which piece is missing).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys

import pytest
import torch
import yaml

import dsv3
from dsv3.cli import main as dsv3_main
from dsv3.errors import Dsv3Error
from dsv3.model.config import builtin_config, config_from_dict, load_config
from dsv3.runtime.loading import build_model
from dsv3.tools import bench
from dsv3.tools.bench import BenchSettings, floor_figures, run_bench, touched_weight_bytes
from dsv3.tools.llama_cpp_peer import find_converter, write_test_tokenizer
from dsv3.tools.random_checkpoint import make_random_checkpoint


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = dsv3_main(argv)
    return code, out.getvalue(), err.getvalue()


# --------------------------------------------------------------------------- missing pieces: one line
def test_missing_llama_cpp_python_is_one_line_naming_the_install(tiny_ckpt, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # import llama_cpp raises ImportError
    code, out, err = run_cli(["bench", "--ckpt-path", str(tiny_ckpt), "--against", "llama.cpp"])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "needs llama-cpp-python" in err and "pip install llama-cpp-python" in err


def test_missing_converter_is_one_line_naming_where_it_ships(tiny_ckpt, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "llama_cpp", type(sys)("llama_cpp"))  # importable, whatever is installed
    monkeypatch.delenv("DSV3_LLAMA_CPP_SRC", raising=False)
    code, _, err = run_cli(["bench", "--ckpt-path", str(tiny_ckpt), "--against", "llama.cpp"])
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "convert_hf_to_gguf.py" in err and "pip download --no-deps --no-binary :all: llama-cpp-python" in err
    code, _, err = run_cli(
        ["bench", "--ckpt-path", str(tiny_ckpt), "--against", "llama.cpp", "--llama-cpp-src", str(tmp_path)]
    )
    assert code == 2 and f"--llama-cpp-src {tmp_path}: no convert_hf_to_gguf.py" in err, err


def test_converter_found_in_the_source_dir_or_an_unpacked_sdist(tmp_path):
    inner = tmp_path / "vendor" / "llama.cpp"
    inner.mkdir(parents=True)
    (inner / "convert_hf_to_gguf.py").write_text("")
    assert find_converter(inner) == inner / "convert_hf_to_gguf.py"
    assert find_converter(tmp_path) == inner / "convert_hf_to_gguf.py"


def test_random_and_ckpt_path_together_are_refused(tiny_ckpt):
    code, _, err = run_cli(["bench", "--ckpt-path", str(tiny_ckpt), "--random", "bench-mid"])
    assert code == 2 and "give --random or --ckpt-path, not both" in err, err


# --------------------------------------------------------------------------- bench configs
WIDTH = (
    "hidden_size", "intermediate_size", "moe_intermediate_size", "num_attention_heads", "q_lora_rank",
    "kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "n_shared_experts", "n_group",
    "topk_group", "num_experts_per_tok", "scoring_func", "topk_method", "rope_theta", "routed_scaling_factor",
)  # fmt: skip


def test_full_width_config_has_the_671b_widths_and_fits_in_a_few_gb():
    full = json.loads(builtin_config("deepseek-v3-671b").read_text())
    raw = yaml.safe_load(builtin_config("bench-full-width").read_text())
    assert {k: raw[k] for k in WIDTH} == {k: full[k] for k in WIDTH}
    assert raw["rope_scaling"] == full["rope_scaling"]
    assert (raw["num_hidden_layers"], raw["n_routed_experts"], raw["first_k_dense_replace"]) == (2, 16, 1)
    model = build_model(config_from_dict(raw), dtype="bfloat16", device="meta")
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    assert 2**30 < nbytes < 5 * 2**30, nbytes  # "a few GB in bf16"


def test_touched_bytes_count_one_embedding_row_and_top_k_routed_experts():
    """Against the per-token weight count written out from the config's shapes (bf16: 2 bytes each)."""
    cfg = load_config("bench-full-width")
    model = build_model(cfg, dtype="bfloat16", device="meta")
    h, heads, i, mi = cfg.hidden_size, cfg.num_attention_heads, cfg.intermediate_size, cfg.moe_intermediate_size
    qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    attn = h * cfg.q_lora_rank + cfg.q_lora_rank * heads * qk + h * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    attn += cfg.kv_lora_rank * heads * (cfg.qk_nope_head_dim + cfg.v_head_dim) + heads * cfg.v_head_dim * h
    norms = 2 * h + cfg.q_lora_rank + cfg.kv_lora_rank
    expert = 3 * h * mi
    dense_layer = attn + norms + 3 * h * i
    moe_layer = attn + norms + cfg.num_experts_per_tok * expert + expert
    params = h + dense_layer + moe_layer + h + cfg.vocab_size * h  # embedding row, layers, final norm, head
    router = 4 * cfg.n_routed_experts * (h + 1)  # the router weight and bias stay float32
    got = touched_weight_bytes(model, cfg)
    assert got["bytes"] == 2 * params + router
    assert got["routed_expert_bytes"] == 2 * cfg.num_experts_per_tok * expert


def test_random_checkpoint_loads_is_deterministic_and_refuses_another_config(tmp_path):
    raw = yaml.safe_load(builtin_config("tiny-v3").read_text())
    spec = tmp_path / "cfg.yaml"
    spec.write_text(yaml.safe_dump({**raw, "num_nextn_predict_layers": 0}))
    a = make_random_checkpoint(spec, tmp_path / "a", "float32", seed=3)
    b = make_random_checkpoint(spec, tmp_path / "b", "float32", seed=3)
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    assert make_random_checkpoint(spec, a, "float32", seed=3) == a  # reused as is
    with pytest.raises(Dsv3Error, match="another config/dtype/seed"):
        make_random_checkpoint(spec, a, "float32", seed=4)
    engine = dsv3.load(a, dtype="float32", progress=False)  # the loader checks every tensor is there
    bias = engine.model.layers[1].ffn.gate_bias
    assert bias.abs().max() > 0  # routing bias not zero: the biased top-k is exercised


def test_test_tokenizer_is_byte_level_with_bos_eos_and_refuses_a_small_vocab(tmp_path):
    from transformers import AutoTokenizer

    write_test_tokenizer(tmp_path, 4096)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert (tok.bos_token_id, tok.eos_token_id) == (0, 1)
    ids = tok.encode("hello wörld", add_special_tokens=False)
    assert tok.decode(ids) == "hello wörld" and max(ids) < 4096
    with pytest.raises(Dsv3Error, match="vocab_size 96"):
        write_test_tokenizer(tmp_path / "small", 96)


# --------------------------------------------------------------------------- a fake llama.cpp
class FakePeer:
    """dsv3's greedy tokens (``same``, filled in by the test), or with the last row's last token changed; fixed
    TTFT and decode seconds; records when it ran."""

    name = "llama.cpp"

    def __init__(self, order: list[str], differ: bool):
        self.order, self.differ, self.closed = order, differ, False

    def generate(self, prompts, n, mtp=0):
        self.order.append("llama.cpp")
        b = prompts.shape[0]
        ids = [list(row) for row in self.same[(b, prompts.shape[1])]]
        if self.differ:  # the last token of the last row only
            ids[-1][-1] = (ids[-1][-1] + 1) % 96
        return ids, {"ttft_s": 0.25, "decode_s": 0.5}

    def weights(self):
        return {"bytes": 1000}

    def close(self):
        self.closed = True


@pytest.mark.parametrize("differ", [False, True])
def test_interleaving_ratios_and_floor_with_a_fake_peer(tiny_ckpt, monkeypatch, differ):
    engine = dsv3.load(tiny_ckpt, dtype="float32", progress=False)
    order: list[str] = []
    peer = FakePeer(order, differ)
    ds_generate = bench.DsRunner.generate

    def recording(self, prompts, n, mtp=0):
        order.append("dsv3")
        return ds_generate(self, prompts, n, mtp)

    monkeypatch.setattr(bench.DsRunner, "generate", recording)
    # the fake answers dsv3's own tokens when it should agree
    runner = bench.DsRunner(engine)
    settings = BenchSettings(prompt_lens=(4,), batch_sizes=(1, 2), decode_tokens=3, decode_prompt_len=4, repeats=3,
                             warmup=1, mtp=())  # fmt: skip
    peer.same = {}
    for b, length in ((1, 16), (1, 4), (2, 4)):
        seed = settings.seed + 7 if length == 16 else settings.seed
        n = 8 if length == 16 else 3
        peer.same[b, length] = ds_generate(runner, bench._prompts(b, length, engine.cfg.vocab_size, seed), n)[0]
    monkeypatch.setattr(bench, "load_llama_cpp", lambda *a, **k: (peer, {"gguf": "x.gguf", "outtype": "f32",
                                                                        "kv_cache_type": "f32"}))  # fmt: skip
    monkeypatch.setattr(
        bench,
        "memcpy_bandwidth",
        lambda: {"buffer_bytes": 1, "copy_bytes_per_s": 10**6, "read_bytes_per_s": 10**6, "bytes_per_s": 10**6},
    )
    order.clear()
    r = run_bench(engine, settings, against="llama.cpp", log=lambda line: None)
    # greedy check, then per point: warm-up dsv3, warm-up peer, then 3 alternating rounds; the shared point once
    assert order == ["dsv3", "llama.cpp"] + ["dsv3", "llama.cpp"] * 4 * 2
    check = r["against"]["greedy_check"]
    assert check["same"] is not differ and check["first_difference"] == (7 if differ else None)  # token 8 of 8
    for p in r["batch_sizes"]:
        b, n = p["batch"], p["decode_tokens"]
        assert p["llama.cpp"]["decode_tokens_per_s"]["median"] == pytest.approx(b * (n - 1) / 0.5)
        want = p["dsv3"]["decode_tokens_per_s"]["median"] / p["llama.cpp"]["decode_tokens_per_s"]["median"]
        assert p["ratio"]["decode_tokens_per_s"] == pytest.approx(want, rel=1e-3)  # rounded to 3 digits
        assert p["same_tokens"] is not differ
        assert p["first_difference"] == ({"token": n - 1, "rows": 1} if differ else None)
    fl = r["bandwidth_floor"]
    floor_s = fl["touched"]["bytes"] / fl["bytes_per_s"]
    assert 0.01 < floor_s * 4 < 100  # the fake 1 MB/s bandwidth makes the fraction a readable number
    assert fl["fraction_of_floor"]["llama.cpp"] == pytest.approx(floor_s * 2 / 0.5, rel=1e-3)  # 1 x 2 tokens / 0.5 s
    assert r["weights"]["llama.cpp"]["bytes"] == 1000 and peer.closed
    text = bench.format_report(r)
    assert "greedy check: " + check["summary"] in text and "of the floor's speed" in text


def test_floor_uses_the_faster_bandwidth_and_the_batch_1_point():
    touched = {"bytes": 1_000_000, "routed_expert_bytes": 0, "experts_per_token": "1 of 2"}
    fl = {"touched": touched, "memcpy_before": {"bytes_per_s": 1e9}, "memcpy_after": {"bytes_per_s": 2e9}}
    point = {"batch": 1, "a": {"decode_tokens_per_s": {"median": 250.0}}}
    out = floor_figures(fl, [{"batch": 8, "a": {"decode_tokens_per_s": {"median": 1.0}}}, point], ["a"])
    assert out["floor_ms_per_token"] == 0.5  # 1 MB / 2 GB/s
    assert out["fraction_of_floor"] == {"a": 0.125}  # 0.5 ms floor / 4 ms per token


# --------------------------------------------------------------------------- the real llama.cpp
def _llama_cpp_missing() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return "llama-cpp-python is not installed (pip install llama-cpp-python)"
    if not os.environ.get("DSV3_LLAMA_CPP_SRC"):
        return "DSV3_LLAMA_CPP_SRC is not set (llama.cpp's sources, for convert_hf_to_gguf.py)"
    return None


@pytest.mark.skipif(_llama_cpp_missing() is not None, reason=str(_llama_cpp_missing()))
def test_real_llama_cpp_makes_dsv3s_greedy_tokens(tmp_path):
    from dsv3.tools.llama_cpp_peer import load_llama_cpp

    raw = yaml.safe_load(builtin_config("tiny-v3").read_text())
    spec = tmp_path / "cfg.yaml"
    spec.write_text(yaml.safe_dump({**raw, "num_nextn_predict_layers": 0, "vocab_size": 512}))
    ckpt = make_random_checkpoint(spec, tmp_path / "ckpt", "float32")
    engine = dsv3.load(ckpt, dtype="float32", progress=False)
    peer, notes = load_llama_cpp(ckpt, torch.float32, 1, None, tmp_path / "gguf", lambda line: None)
    try:
        prompts = bench._prompts(2, 12, 512, 0)
        mine, _ = bench.DsRunner(engine).generate(prompts, 6)
        theirs, stats = peer.generate(prompts, 6)
        assert theirs == mine and stats["ttft_s"] > 0 and notes["outtype"] == "f32"
    finally:
        peer.close()
