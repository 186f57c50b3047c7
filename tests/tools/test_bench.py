"""``dsv3 bench`` end to end on a tiny checkpoint: every JSON field, the ratios against transformers, the plots,
and the clear errors. Minimal settings (one repetition, a few tokens); no timing is asserted, only that each
figure exists, is positive where it must be, and that the memory figures agree with the checkpoint's shapes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys

import pytest
from safetensors import safe_open

from dsv3.cli import main as dsv3_main
from dsv3.tools.bench import busy_note
from tests.helpers import make_checkpoint, quantize_checkpoint

FAST = [
    "--dtype", "float32", "--prompt-lens", "4,8", "--batch-sizes", "1,2", "--decode-tokens", "3",
    "--decode-prompt-len", "4", "--repeats", "1", "--warmup", "0",
]  # fmt: skip
FIGURES = ("ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "run_wall_s", "run_cpu_s")


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = dsv3_main(argv)
    return code, out.getvalue(), err.getvalue()


def tensor_sizes(path) -> dict[str, int]:
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@pytest.fixture(scope="module")
def against(tiny_ckpt, tmp_path_factory):
    """One run against transformers with MTP and plots; (result dict, plot dir, stdout)."""
    out = tmp_path_factory.mktemp("bench")
    args = ["bench", "--ckpt-path", str(tiny_ckpt), *FAST, "--mtp", "1", "--against", "transformers"]
    args += ["--json", str(out / "bench.json")]
    plots = None
    if _has_matplotlib():
        plots = out / "plots"
        args += ["--plot-dir", str(plots)]
    code, stdout, err = run_cli(args)
    assert code == 0, err
    return json.loads((out / "bench.json").read_text()), plots, stdout


def _has_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def check_figures(f: dict, repeats: int = 1) -> None:
    for key in FIGURES:
        st = f[key]
        assert set(st) == {"min", "median", "max", "runs"}, key
        assert len(st["runs"]) == repeats and st["min"] <= st["median"] <= st["max"], key
        assert st["min"] > 0 or key == "run_cpu_s", key


def test_every_field_and_ratios_against_transformers(against, tiny_ckpt):
    r, _, stdout = against
    check = r["against"].pop("greedy_check")  # same greedy tokens on a short prompt, in float32
    assert check["same"] and check["dsv3"] == check["transformers"] and len(check["dsv3"]) == 8
    assert r["impls"] == ["dsv3", "transformers"] and r["against"] == {"name": "transformers", "status": "ok"}
    for key in ("machine", "checkpoint", "settings", "load_average_before", "load_average_after", "created"):
        assert key in r, key
    assert r["settings"]["prompt_lens"] == [4, 8] and r["settings"]["batch_sizes"] == [1, 2]
    sections = {"prompt_lengths": ("prompt_len", [4, 8]), "batch_sizes": ("batch", [1, 2])}
    for section, (axis, values) in sections.items():
        assert [p[axis] for p in r[section]] == values
        for p in r[section]:
            for impl in r["impls"]:
                check_figures(p[impl])
            assert set(p["ratio"]) == set(FIGURES) and all(v > 0 for v in p["ratio"].values())
            # float32, greedy, same prompts: both implementations must make the same tokens
            assert p["same_tokens"] is True
    assert "dsv3/peer" in stdout and "KV cache bytes per token" in stdout


def test_memory_figures_follow_the_checkpoint(against, tiny_ckpt):
    r, _, _ = against
    cfg = json.loads((tiny_ckpt / "config.json").read_text())
    layers, heads = cfg["num_hidden_layers"], cfg["num_attention_heads"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    kv = r["kv_cache"]
    assert kv["dsv3_absorb"]["bytes_per_token"] == layers * (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * 4
    assert kv["dsv3_naive"]["bytes_per_token"] == layers * heads * (qk + cfg["v_head_dim"]) * 4
    assert kv["transformers"]["bytes_per_token"] > 0 and "layout" in kv["transformers"]

    sizes = tensor_sizes(tiny_ckpt)
    mtp = f"model.layers.{layers}."
    main = sum(numel(s) for k, s in sizes.items() if not k.startswith(mtp))
    # the MTP layer's embedding and head equal the main ones and are held once
    shared = (mtp + "embed_tokens.weight", mtp + "shared_head.head.weight")
    extra = sum(numel(s) for k, s in sizes.items() if k.startswith(mtp) and k not in shared)
    w = r["weights"]
    assert w["transformers"]["params"] == main  # transformers drops the MTP layer
    assert w["dsv3"]["params"] == main + extra
    for impl in ("dsv3", "transformers"):
        assert w[impl]["bytes_per_param"] == 4.0  # float32 throughout


def test_mtp_rows(against):
    r, _, _ = against
    rows = r["mtp"]["rows"]
    assert [(row["k"], row["batch"]) for row in rows] == [(1, 1), (1, 2)]  # at every batch size
    for row, point in zip(rows, r["batch_sizes"], strict=True):
        assert len(row["acceptance_rate"]) == 1 and 0.0 <= row["acceptance_rate"][0] <= 1.0
        assert 1.0 <= row["tokens_per_forward"] <= 2.0
        assert row["speedup"] > 0 and row["decode_tokens_per_s"]["median"] > 0
        assert row["same_tokens_as_plain"] is True  # greedy MTP is lossless
        # plain decoding is the batch table's dsv3 figure, the same runs: the two can never disagree
        assert row["plain_decode_tokens_per_s"] == point["dsv3"]["decode_tokens_per_s"]
        assert len(row["speedup_per_run"]["runs"]) == 1


def test_shared_point_measured_once_and_labelled(against):
    r, _, stdout = against
    # batch 1 / prompt 4 is in both sweeps: one measurement, shown in both tables and said so
    assert r["prompt_lengths"][0]["dsv3"] == r["batch_sizes"][0]["dsv3"]
    assert "(prompt 4: the same runs as batch 1 of the next table)" in stdout
    assert "tokens 2..3 of every row, TTFT excluded" in stdout and "TTFT ms: call to first token" in stdout
    assert "By prompt length: batch 1, 3 new tokens" in stdout
    assert "By batch size: prompt 4, 3 new tokens per row" in stdout
    assert "plain = the dsv3 row of the batch table, timed in the same turns" in stdout
    assert "  batch 2, k=1: acceptance per draft position" in stdout


def test_mtp_zero_is_plain_decoding(tiny_ckpt, tmp_path):
    """--mtp 0,1: 0 is plain decoding (always measured), so only k=1 rows; --mtp 0: none, and said."""
    out = tmp_path / "b.json"
    args = ["bench", "--ckpt-path", str(tiny_ckpt), *FAST, "--batch-sizes", "2", "--json", str(out)]
    code, stdout, err = run_cli([*args, "--mtp", "0,1"])
    assert code == 0, err  # before: "--mtp takes draft counts >= 1"
    r = json.loads(out.read_text())
    assert r["settings"]["mtp"] == [1] and [row["k"] for row in r["mtp"]["rows"]] == [1]
    code, stdout, err = run_cli([*args, "--mtp", "0"])
    assert code == 0, err
    r = json.loads(out.read_text())
    assert r["mtp"] == {"rows": [], "note": "not asked (--mtp 0)"} and "not asked (--mtp 0)" in stdout


def test_busy_machine_is_noted():
    r = {"machine": {"cpu_count": 2, "torch_threads": 2}, "load_average_before": [3.1, 2, 1]}
    r["load_average_after"] = [1.0, 1, 1]
    note = busy_note(r)
    assert note.startswith("note: the machine was busy (1-minute load average up to 3.1 on 2 CPUs)")
    assert "--threads 1 is steadier" in note
    r["machine"]["torch_threads"] = 1
    assert "--threads" not in busy_note(r)
    r["load_average_before"] = [1.5, 1, 1]
    assert busy_note(r) is None


def test_plots_written(against):
    if not _has_matplotlib():
        pytest.skip("matplotlib is not installed (pip install 'dsv3[bench]'): no plots to check")
    _, plots, _ = against
    names = sorted(p.name for p in plots.iterdir())
    assert names == ["decode_vs_batch.png", "memory_per_token.png", "mtp_vs_batch.png", "tokens_vs_prompt_length.png"]
    for name in names:
        assert (plots / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name


def test_no_mtp_layers_and_no_peer(tmp_path):
    ckpt = make_checkpoint(tmp_path / "no-mtp", seed=1)
    code, stdout, err = run_cli(["bench", "--ckpt-path", str(ckpt), *FAST, "--json", str(tmp_path / "b.json")])
    assert code == 0, err
    r = json.loads((tmp_path / "b.json").read_text())
    assert r["impls"] == ["dsv3"] and r["against"] is None and r["mtp"]["rows"] == []
    assert "no MTP layers" in r["mtp"]["note"] and "no MTP layers" in stdout
    assert "ratio" not in r["prompt_lengths"][0] and "transformers" not in r["kv_cache"]


def test_quantized_checkpoint_peer_is_reported_not_fatal(tiny_ckpt, tmp_path):
    fp8 = quantize_checkpoint(tiny_ckpt, tmp_path / "fp8", "fp8")
    args = ["bench", "--ckpt-path", str(fp8), *FAST, "--mtp", "0", "--against", "transformers"]
    code, stdout, err = run_cli([*args, "--json", str(tmp_path / "q.json")])
    assert code == 0, err
    r = json.loads((tmp_path / "q.json").read_text())
    assert r["checkpoint"]["quantization"] == "fp8"
    assert r["weights"]["dsv3"]["bytes_per_param"] < 4.0  # fp8 linears: 1 byte per weight plus scales
    if r["against"]["status"] != "ok":  # transformers could not load or run it: said, and dsv3 still measured
        assert r["against"]["status"].startswith("transformers cannot run") and "peer skipped" in stdout
        assert r["impls"] == ["dsv3"] and "ratio" not in r["batch_sizes"][0]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--prompt-lens", "4,x"], "--prompt-lens takes comma-separated integers"),
        (["--batch-sizes", "0"], "--batch-sizes must be"),
        (["--decode-tokens", "1"], "--decode-tokens must be at least 2"),
        (["--prompt-lens", "4,126"], "max_position_embeddings"),
        (["--mtp", "1,-1"], "--mtp takes draft counts >= 0"),
    ],
)
def test_bad_settings_one_line_and_nothing_written(tiny_ckpt, tmp_path, extra, message):
    out = tmp_path / "b.json"
    code, _, err = run_cli(["bench", "--ckpt-path", str(tiny_ckpt), *FAST, *extra, "--json", str(out)])
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_a_json_path_that_is_a_fifo_is_refused_before_measuring(tiny_ckpt, tmp_path):
    """Before the fix the report was renamed over it: the FIFO became a regular file."""
    fifo = tmp_path / "b.json"
    os.mkfifo(fifo)
    code, out, err = run_cli(["bench", "--ckpt-path", str(tiny_ckpt), *FAST, "--json", str(fifo)])
    assert (
        code == 2
        and err.strip() == f"dsv3: error: {fifo}: not a regular file; give the path of a file to write the report to"
    )
    assert out == "" and stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_a_whole_graph_backend_is_refused_in_one_line(tiny_ckpt):
    """onnxruntime runs a whole exported graph: before the fix, bench measured it and then failed with
    AttributeError on model.ops.act_quant (and on the cache's layout after that)."""
    code, out, err = run_cli(["bench", "--ckpt-path", str(tiny_ckpt), *FAST, "--backend", "onnxruntime"])
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "--backend onnxruntime: this backend runs a whole exported graph" in err


def test_plot_dir_without_matplotlib_fails_before_measuring(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "b.json"
    args = ["bench", "--ckpt-path", str(tiny_ckpt), *FAST, "--json", str(out), "--plot-dir", str(tmp_path / "p")]
    code, _, err = run_cli(args)
    assert code == 2 and "--plot-dir needs matplotlib" in err
    assert not out.exists() and not (tmp_path / "p").exists()
