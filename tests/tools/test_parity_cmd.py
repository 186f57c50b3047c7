"""``dsv3 parity`` and ``dsv3.tools.parity``: per-place differences and the first divergence, on a tiny checkpoint.

A single-layer error is planted by perturbing one layer's weight in the model under test after
loading (operators are shared by all layers, so a wrong op would show up in layer 0 already).
"""

from __future__ import annotations

import json

import pytest
import torch

from dsv3.cli import main as cli_main
from dsv3.tools.parity import PARITY_RTOL, capture, run_parity
from tests.helpers import add_tiny_tokenizer, make_checkpoint


def places(n_layers: int) -> list[str]:
    out = ["embed"]
    for i in range(n_layers):
        out += [f"layers.{i}.attn", f"layers.{i}.ffn", f"layers.{i}"]
    return out + ["norm", "logits"]


def test_identical_backends_agree_everywhere(tiny_ckpt):
    report = run_parity(tiny_ckpt, "cpu_ref", tokens=[3, 1, 4, 1, 5, 9, 2, 6])
    assert report.ok and report.first_divergence is None
    assert [p.place for p in report.places] == places(3)
    assert all(p.max_abs == 0 for p in report.places)
    assert all(p.ref_rms > 0 for p in report.places)
    assert "no divergence" in report.format_table()


@pytest.mark.parametrize(
    "layer, module, weight, first",
    [
        (1, "attn", "wq_b", "layers.1.attn"),  # a dense layer's attention
        (2, "ffn", "w2", "layers.2.ffn"),  # a MoE layer's routed experts
        (0, "ffn", "w1", "layers.0.ffn"),  # the dense MLP of the first layer
    ],
)
def test_a_planted_single_layer_error_is_named_first(tiny_ckpt, layer, module, weight, first):
    def perturb(model):
        w = getattr(getattr(model.layers[layer], module), weight).weight
        w.mul_(1.0 + 0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))

    report = run_parity(tiny_ckpt, "cpu_ref", tokens=[3, 1, 4, 1, 5, 9, 2, 6], perturb=perturb)
    assert not report.ok
    assert report.first_divergence.place == first
    names = [p.place for p in report.places]
    before = names[: names.index(first)]
    assert all(p.ok and p.max_abs == 0 for p in report.places if p.place in before)
    assert not report.places[-1].ok  # the error reaches the logits
    assert f"first divergence: {first}" in report.format_table()


def test_capture_hooks_are_removed(tiny_ckpt):
    import dsv3

    model = dsv3.load(tiny_ckpt, dtype="float32").model
    tokens = torch.tensor([[1, 2, 3]])
    acts = capture(model, tokens)
    assert acts["logits"].shape == (1, 3, model.cfg.vocab_size)
    assert acts["layers.2.ffn"].shape == (1, 3, model.cfg.hidden_size)
    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    assert hooks == 0


def test_cli_reports_and_writes_json(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "parity.json"
    rc = cli_main(
        ["parity", "--backend", "cpu_ref", "--ckpt-path", str(tiny_ckpt), "--tokens", "5, 6 7", "--json", str(out)]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "layers.1.attn" in text and "no divergence" in text
    data = json.loads(out.read_text())
    assert data["ok"] and data["first_divergence"] is None and data["tokens"] == [[5, 6, 7]]
    assert data["rtol"] == PARITY_RTOL[torch.float32]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--tokens", "1,x"], "'x' is not an integer"),
        (["--tokens", "1,100000"], "token id 100000 is outside the vocabulary"),
        (["--prompt", "hello"], "no tokenizer"),
        (["--rtol", "0"], "--rtol must be positive"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(tiny_ckpt, capsys, argv, message):
    rc = cli_main(["parity", "--backend", "cpu_ref", "--ckpt-path", str(tiny_ckpt), *argv])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_whole_graph_backend_is_refused_with_a_pointer_that_works(tmp_path, capsys, monkeypatch):
    """onnxruntime runs one exported graph: no layers to hook (before: AttributeError on ``model.layers``).

    The command the message points to must itself run (it exports the tiny checkpoint: a few seconds).
    """
    ckpt = add_tiny_tokenizer(make_checkpoint(tmp_path / "ckpt"))
    capsys.readouterr()  # transformers' progress bar while writing the checkpoint
    for argv in (["--backend", "onnxruntime"], ["--backend", "cpu_ref", "--against", "onnxruntime"]):
        rc = cli_main(["parity", *argv, "--ckpt-path", str(ckpt)])
        err = capsys.readouterr().err
        assert rc == 2 and len(err.strip().splitlines()) == 1, err
        assert "whole exported graph, so it has no layers to compare" in err
    pointer = err.split("compare its logits instead: ", 1)[1].strip()
    assert pointer.startswith("dsv3 eval perplexity --backend cpu_ref --against onnxruntime --ckpt-path ")

    pytest.importorskip("onnxruntime", reason="running the pointed-to command needs the onnx extra")
    pytest.importorskip("onnx", reason="running the pointed-to command needs the onnx extra")
    from dsv3.backends.onnxruntime.runner import CACHE_ENV

    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "cache"))
    text = tmp_path / "text.txt"
    text.write_text("hello world " * 8)
    argv = pointer.removeprefix("dsv3 ").replace("FILE", str(text)).split()
    assert cli_main([*argv, "--dtype", "float32", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "onnxruntime float32, whole exported graph" in out and "top-1 agreement  100.00 %" in out
