"""scripts/train_tiny.py: the same seed and steps give the same loss curve; resuming continues it exactly."""

from __future__ import annotations

import importlib.util
import shutil
import sysconfig
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_tiny.py"
#: Small standard-library modules present in every supported Python: a corpus slice of ~40 KB.
SLICE = ("bisect.py", "colorsys.py", "keyword.py", "heapq.py", "this.py", "fnmatch.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("train_tiny", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tt():
    return _load_script()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in SLICE:
        shutil.copy(stdlib / name, root / name)
    return root


def _losses(tt, out: Path, corpus: Path, seed: int, *extra: str) -> list[float]:
    argv = [
        "--out", str(out), "--corpus-dir", str(corpus), "--preset", "test", "--vocab-size", "300",
        "--seed", str(seed), "--steps", "4", "--warmup", "2", "--batch", "2", "--seq-len", "24",
        "--eval-every", "0", "--ckpt-every", "0", "--no-progress", "--no-log", "--threads", "1", *extra,
    ]  # fmt: skip
    history = tt.train(tt.parse_args(argv))
    return [h["loss"] for h in history if h["kind"] == "train"]


def test_same_seed_same_curve_other_seed_differs(tt, corpus, tmp_path):
    a = _losses(tt, tmp_path / "a", corpus, seed=3)
    b = _losses(tt, tmp_path / "b", corpus, seed=3)
    c = _losses(tt, tmp_path / "c", corpus, seed=4)
    assert len(a) == 4
    assert a == b  # bit-identical: batches and initial weights are pure functions of the seed
    assert a != c
    assert all(x == x and x > 0 for x in a)  # finite, positive cross-entropies


def test_resume_continues_the_same_curve(tt, corpus, tmp_path):
    full = _losses(tt, tmp_path / "full", corpus, seed=5)
    first = _losses(tt, tmp_path / "part", corpus, 5, "--stop-at-step", "2")
    resumed = _losses(tt, tmp_path / "part", corpus, 5, "--resume")
    assert len(first) == 2
    assert resumed == full  # the resumed history holds steps 1-2 from the checkpoint, then 3-4


def test_routing_bias_moves_against_the_load(tt, corpus, tmp_path):
    import torch

    from dsv3.tools.training import moe_modules, start_load_counting, update_routing_bias

    cfg = tt.model_config("test", 300)
    model = tt.make_model(cfg, seed=0)
    (_, moe), *_ = moe_modules(model)
    start_load_counting(model)
    moe.load += torch.tensor([9.0, 1.0, 1.0, 1.0])  # mean 3: expert 0 overloaded, others under
    update_routing_bias(model, 0.01)
    assert moe.gate_bias.tolist() == pytest.approx([-0.01, 0.01, 0.01, 0.01])
    assert moe.load.sum() == 0  # counts reset for the next step
