"""The model shipped inside the package: found by default, loads, and `dsv3 run` completes with it."""

from __future__ import annotations

import subprocess
import sys

from dsv3.runtime.loading import embedded_model_path


def test_embedded_model_is_installed():
    path = embedded_model_path()
    assert path is not None, "dsv3/embedded/tiny-dsv3 is missing from this installation"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (path / name).is_file(), name


def test_dsv3_run_without_ckpt_path_prints_a_continuation():
    cmd = [sys.executable, "-m", "dsv3", "run", "--prompt", "def add(a, b):", "--max-new-tokens", "6"]
    proc = subprocess.run(cmd + ["--temperature", "0"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip(), f"empty continuation; stderr: {proc.stderr}"
