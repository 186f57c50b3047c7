"""``dsv3 convert`` on tiny checkpoints: the outputs load and run, round trips stay within each
format's bound, the input is never touched and a failed conversion leaves nothing behind.

Bounds (see tests/unit/test_quant_format.py and docs/quantization.md): fp8 block
``|w - w'| <= max(2^-4 |w|, 2^-10 s)``, int8 ``|w - w'| <= s / 2``, plus ``2^-8 |w'|`` for the
final bf16 rounding. Logits of a quantized conversion against its BF16 source (weights only,
--act-quant none): fp8 relative RMS <= 0.15 (per-element weight error RMS ~2.7%, observed ~0.07),
int8 <= 0.05 (observed ~0.02).
"""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import dsv3
from dsv3 import cli
from dsv3 import convert as conv
from dsv3.errors import Dsv3Error
from dsv3.quantize import expand_blocks
from tests.helpers import QUANT_SHAPES, make_checkpoint, quantize_checkpoint

TOKENS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))


def _add_tokenizer(path) -> None:
    """A word-level tokenizer over the tiny vocabulary (ids 0/1 are bos/eos, as in TINY)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<unk>", "hello", "world"] + [f"w{i}" for i in range(5, 96)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))


def _fingerprint(path):
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(path.iterdir())}


def _tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A BF16 checkpoint (what a BF16 release looks like) with a tokenizer, and its fingerprint."""
    root = tmp_path_factory.mktemp("convert")
    fp32 = make_checkpoint(root / "fp32", seed=2, mtp=True, **QUANT_SHAPES)
    _add_tokenizer(fp32)
    bf16 = quantize_checkpoint(fp32, root / "bf16", "bf16")
    return bf16, _fingerprint(bf16)


@pytest.fixture(scope="module")
def fp8(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "ckpt"
    assert cli.main(["convert", "--ckpt-path", str(src[0]), "--out", str(out), "--to", "fp8", "--no-progress"]) == 0
    return out


def _logits(path, act_quant="none"):
    return dsv3.load(path, dtype="float32", act_quant=act_quant, progress=False).logits(TOKENS)


def _rel_rms(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_bf16_to_fp8_writes_the_released_layout(src, fp8):
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    t, s = _tensors(fp8), _tensors(src[0])
    for name, value in s.items():
        if conv.is_quantized_projection(name):
            assert t[name].dtype == torch.float8_e4m3fn, name
            sc = t[name[: -len("weight")] + "weight_scale_inv"]
            assert sc.dtype == torch.float32 and sc.shape == (-(-value.shape[0] // 128), -(-value.shape[1] // 128))
        else:  # norms, embeddings, lm_head, router gate and bias, eh_proj, shared_head: copied byte for byte
            assert torch.equal(t[name], value) and t[name].dtype == value.dtype, name
    assert "model.layers.3.eh_proj.weight_scale_inv" not in t and "lm_head.weight_scale_inv" not in t
    assert "model.layers.3.self_attn.kv_b_proj.weight_scale_inv" in t, "MTP layer projections are quantized"
    assert (fp8 / "tokenizer.json").read_bytes() == (src[0] / "tokenizer.json").read_bytes()
    err = _rel_rms(_logits(fp8), _logits(src[0]))
    assert 0 < err <= 0.15, err


def test_fp8_to_bf16_loads_anywhere_and_runs(src, fp8, tmp_path):
    out = tmp_path / "bf16"
    assert cli.main(["convert", "--ckpt-path", str(fp8), "--out", str(out), "--to", "bf16", "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    t = _tensors(out)
    assert not any(k.endswith(("_scale_inv", "_scale")) for k in t)
    assert all(v.dtype != torch.float8_e4m3fn for v in t.values())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src[0] / name).read_bytes(), name
    engine = dsv3.load(out, dtype="bfloat16", progress=False)
    [done] = engine.generate(["hello world"], max_new_tokens=4, temperature=0.0)
    assert engine.tokenizer is not None and len(done.token_ids) >= 1 and isinstance(done.text, str)


def test_round_trip_bf16_fp8_bf16_within_bound(src, fp8, tmp_path):
    back = _tensors(quantize_checkpoint(fp8, tmp_path / "back", "bf16"))
    q, s = _tensors(fp8), _tensors(src[0])
    checked = 0
    for name, w in s.items():
        if not conv.is_quantized_projection(name):
            assert torch.equal(back[name], w)
            continue
        w, w2 = w.float(), back[name].float()
        scale = expand_blocks(q[name[: -len("weight")] + "weight_scale_inv"], *w.shape)
        bound = torch.maximum(2.0**-4 * w.abs(), 2.0**-10 * scale) + 2.0**-8 * w2.abs() + 2.0**-21 * w.abs()
        assert bool(((w2 - w).abs() <= bound).all()), name
        checked += 1
    assert checked > 30


def test_round_trip_bf16_int8_within_half_a_step_and_runs(src, tmp_path):
    i8 = quantize_checkpoint(src[0], tmp_path / "int8", "int8")
    cfg = json.loads((i8 / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "int8"
    assert cfg["quantization_config"]["activation_scheme"] == "dynamic"
    q, s = _tensors(i8), _tensors(src[0])
    back = _tensors(quantize_checkpoint(i8, tmp_path / "back", "bf16"))
    for name, w in s.items():
        if conv.is_quantized_projection(name):
            scale = q[name[: -len("weight")] + "weight_scale"]
            assert q[name].dtype == torch.int8 and scale.shape == w.shape[:1]
            w, w2 = w.float(), back[name].float()
            bound = scale.unsqueeze(-1) / 2 + 2.0**-8 * w2.abs() + 2.0**-21 * w.abs()
            assert bool(((w2 - w).abs() <= bound).all()), name
    ref = _logits(src[0])
    err = _rel_rms(_logits(i8), ref)
    assert 0 < err <= 0.05, err
    assert _rel_rms(_logits(i8, "dynamic"), ref) <= 0.05


def test_fp8_to_int8(fp8, tmp_path):
    i8 = quantize_checkpoint(fp8, tmp_path / "int8", "int8")
    assert _rel_rms(_logits(i8), _logits(fp8)) <= 0.05


def test_sharded_output_has_an_index_and_loads_identically(fp8, tmp_path):
    out = quantize_checkpoint(fp8, tmp_path / "sharded", "int8", max_shard_size="300KB")
    single = quantize_checkpoint(fp8, tmp_path / "single", "int8")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {f.name for f in files}
    sizes = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                sizes[f.name] = sizes.get(f.name, 0) + t.numel() * t.element_size()
                assert index["weight_map"][k] == f.name
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert all(size <= 300_000 for size in sizes.values())  # no single item here exceeds the limit
    for k, fname in index["weight_map"].items():  # a weight and its scale are never split apart
        if k.endswith("weight_scale"):
            assert index["weight_map"][k[: -len("_scale")]] == fname
    assert torch.equal(_logits(out), _logits(single))


def test_input_is_never_modified(src, fp8, tmp_path):
    quantize_checkpoint(src[0], tmp_path / "again", "fp8", scale_fmt="ue8m0")
    assert _fingerprint(src[0]) == src[1]


# ----------------------------------------------------------------- refusals and failures


def test_refuses_to_write_over_or_around_its_input(src, tmp_path):
    s = src[0]
    for out, force in ((s, True), (s / "sub", True), (s.parent, True)):
        with pytest.raises(Dsv3Error, match="--out"):
            conv.convert_checkpoint(s, out, "int8", force=force, progress=False)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(Dsv3Error, match="not empty .*--force"):
        conv.convert_checkpoint(s, busy, "int8", progress=False)
    assert (busy / "keep.txt").read_text() == "mine"
    conv.convert_checkpoint(s, busy, "int8", force=True, progress=False)
    assert not (busy / "keep.txt").exists() and (busy / "config.json").exists()
    assert _fingerprint(s) == src[1]


def test_cli_reports_bad_arguments_on_one_line(src, tmp_path, capsys):
    code = cli.main(
        ["convert", "--ckpt-path", str(src[0]), "--out", str(tmp_path / "x"), "--to", "bf16"]
        + [
            "--scale-fmt",
            "ue8m0",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "dsv3: error: --scale-fmt applies to --to fp8 only"
    assert (
        cli.main(["convert", "--ckpt-path", str(tmp_path / "nope"), "--out", str(tmp_path / "y"), "--to", "fp8"]) == 2
    )
    assert "checkpoint directory not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_failure_mid_conversion_leaves_no_output(src, tmp_path, monkeypatch):
    real_save = conv.save_file
    calls = []

    def disk_full_on_second_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(conv, "save_file", disk_full_on_second_shard)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="No space left"):
        conv.convert_checkpoint(src[0], out, "fp8", max_shard_size="200KB", progress=False)
    assert len(calls) == 2, "the first shard was written before the failure"
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [], "no temporary directory is left behind"

    old = tmp_path / "old"  # with --force, the previous output survives a failed replacement
    old.mkdir()
    (old / "config.json").write_text("{}")
    calls.clear()
    with pytest.raises(OSError):
        conv.convert_checkpoint(src[0], old, "fp8", max_shard_size="200KB", force=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and (old / "config.json").read_text() == "{}"
    assert _fingerprint(src[0]) == src[1]


def test_corrupt_input_shard_fails_clearly_and_writes_nothing(src, tmp_path):
    sharded = quantize_checkpoint(src[0], tmp_path / "sharded", "bf16", max_shard_size="400KB")
    victim = sorted(sharded.glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = _fingerprint(sharded)
    out = tmp_path / "out"
    with pytest.raises(Dsv3Error, match=rf"{victim.name}: not a readable safetensors file"):
        conv.convert_checkpoint(sharded, out, "int8", progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]
    assert _fingerprint(sharded) == before


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, n: t.pop(n + "_scale_inv"), r"missing scale tensor .* F8_E4M3 weight model\.layers\.0\.self_attn"),
        (
            lambda t, n: t.__setitem__(n + "_scale_inv", torch.ones(3, 3)),
            r"scale tensor .*q_a_proj\.weight_scale_inv has shape \[3, 3\], expected \[2, 2\]",
        ),
    ],
)
def test_bad_scales_in_the_input_are_named(fp8, tmp_path, edit, message):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    edit(tensors, "model.layers.0.self_attn.q_a_proj.weight")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(Dsv3Error, match=message):
        conv.convert_checkpoint(bad, tmp_path / "out", "bf16", progress=False)
    assert not (tmp_path / "out").exists()
