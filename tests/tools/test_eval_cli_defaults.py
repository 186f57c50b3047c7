"""``dsv3 eval perplexity`` without ``--context``: the window is the checkpoint's training context
(config.json ``dsv3_train_context``), else max_position_embeddings capped at 4096; the report says which
and where it came from. The embedded model carries its 256-token training context, as train_tiny.py writes it.
"""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path

import pytest

from dsv3.cli import main as dsv3_main
from dsv3.commands.eval import CONTEXT_CAP, TRAIN_CONTEXT_KEY, default_context
from dsv3.model.config import config_from_dict, load_config
from dsv3.runtime.loading import embedded_model_path
from tests.helpers import TINY, TINY_WORDS, add_tiny_tokenizer, make_checkpoint

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_tiny.py"


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    path = make_checkpoint(tmp_path_factory.mktemp("eval-defaults") / "tiny", seed=0)
    return add_tiny_tokenizer(path)


@pytest.fixture(scope="module")
def text_file(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "words.txt"
    path.write_text(" ".join(rng.choice(TINY_WORDS) for _ in range(200)) + "\n")
    return path


def with_config(base: Path, dst: Path, **changes) -> Path:
    """A copy of the checkpoint whose config.json has ``changes`` applied."""
    shutil.copytree(base, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def run_eval(ckpt: Path, text_file: Path, out: Path, *extra: str) -> tuple[int, dict | None]:
    argv = ["eval", "perplexity", "--ckpt-path", str(ckpt), "--text-file", str(text_file), "--no-progress"]
    code = dsv3_main([*argv, "--dtype", "float32", "--json", str(out), *extra])
    return code, json.loads(out.read_text()) if out.exists() else None


def test_default_context_is_the_training_context_and_is_reported(base, text_file, tmp_path, capsys):
    ckpt = with_config(base, tmp_path / "ckpt", **{TRAIN_CONTEXT_KEY: 24})
    code, report = run_eval(ckpt, text_file, tmp_path / "r.json")
    assert code == 0
    # before: min(512, max_position_embeddings) = 128 whatever the checkpoint was trained on
    assert report["context"] == 24 and report["stride"] == 12
    source = report["setup"]["context_source"]
    assert source == f"the model's training context ({TRAIN_CONTEXT_KEY} in {ckpt / 'config.json'})"
    assert f"  context    24 tokens: {source}" in capsys.readouterr().out


def test_without_training_context_max_positions_are_used(base, text_file, tmp_path, capsys):
    code, report = run_eval(base, text_file, tmp_path / "r.json")
    assert code == 0 and report["context"] == TINY["max_position_embeddings"] == 128
    assert report["setup"]["context_source"].startswith("max_position_embeddings (")
    assert f"gives no {TRAIN_CONTEXT_KEY}" in capsys.readouterr().out


def test_long_position_tables_are_capped():
    raw = {**TINY, "max_position_embeddings": 163840}
    context, source = default_context(config_from_dict(raw), "config.json")
    assert context == CONTEXT_CAP == 4096
    assert source.startswith(f"max_position_embeddings 163840 capped at {CONTEXT_CAP}")


def test_a_context_past_the_training_context_is_said(base, text_file, tmp_path):
    ckpt = with_config(base, tmp_path / "ckpt", **{TRAIN_CONTEXT_KEY: 24})
    code, report = run_eval(ckpt, text_file, tmp_path / "r.json", "--context", "48")
    assert code == 0 and report["context"] == 48
    assert report["setup"]["context_source"] == "--context; longer than the 24-token training context, " + (
        "so perplexity is higher than trained"
    )


@pytest.mark.parametrize("value", [0, 1000, "256", True])
def test_a_bad_training_context_is_one_line(base, text_file, tmp_path, capsys, value):
    ckpt = with_config(base, tmp_path / "ckpt", **{TRAIN_CONTEXT_KEY: value})
    code, report = run_eval(ckpt, text_file, tmp_path / "r.json")
    err = capsys.readouterr().err
    assert code == 2 and report is None
    assert err.count("\n") == 1 and f"config.json: {TRAIN_CONTEXT_KEY} {value!r} must be an integer" in err, err


def test_the_embedded_model_carries_its_training_context():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    tt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tt)
    trained_on = tt.parse_args([]).seq_len  # the shipped run used the default --seq-len (docs/embedded-model.md)
    bf16 = embedded_model_path()
    for path in (bf16, bf16.parent / "tiny-dsv3-fp8"):
        cfg = load_config(path / "config.json")
        assert cfg.extra[TRAIN_CONTEXT_KEY] == trained_on == 256, path
    # train_tiny.py writes the released config.json exactly as shipped, the field included
    written = tt.hf_config(load_config(bf16 / "config.json"), "bfloat16", trained_on)
    assert written == json.loads((bf16 / "config.json").read_text())
