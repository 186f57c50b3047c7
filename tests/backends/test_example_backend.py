"""examples/dsv3-example-backend, pip-installed into a fresh virtual environment, is found and passes.

The venv is made from the running interpreter (``sys.executable``) with ``--system-site-packages``
and a ``.pth`` file that adds this interpreter's own site-packages: when the tests run inside a
venv (CI, /work/venv), torch and dsv3 live there, not in the base Python that
``--system-site-packages`` points at. No download: ``pip install --no-deps --no-build-isolation``.
"""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest

from tests.helpers import add_tiny_tokenizer, make_checkpoint

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
EXAMPLE = REPO / "examples" / "dsv3-example-backend"


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=240, **kwargs)


def setuptools_is_recent() -> bool:
    try:
        major, minor = (int(p) for p in version("setuptools").split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (70, 1)  # builds wheels without the separate `wheel` package


@pytest.fixture(scope="module")
def example_venv(tmp_path_factory) -> Path:
    """A fresh venv with the example backend pip-installed; returns its python."""
    root = tmp_path_factory.mktemp("example-venv")
    venv = root / "venv"
    made = run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)])
    assert made.returncode == 0, made.stderr
    python = venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")
    purelib = run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip()
    parents = [p for p in site.getsitepackages() if Path(p).is_dir()]
    bridge = "".join(f"import site; site.addsitedir({p!r})\n" for p in parents)
    (Path(purelib) / "_parent_env.pth").write_text(bridge)

    found = run([str(python), "-c", "import dsv3, torch; print(dsv3.__file__)"])
    assert found.returncode == 0, f"dsv3 is not importable in the new venv: {found.stderr[-500:]}"

    src = root / "src"  # pip builds in the source tree: build from a copy, never in the checkout
    shutil.copytree(EXAMPLE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    cmd = [str(python), "-m", "pip", "install", "--no-deps", "--disable-pip-version-check", "-q"]
    if setuptools_is_recent():
        cmd.append("--no-build-isolation")  # no download; otherwise pip fetches setuptools for the build
    installed = run([*cmd, str(src)])
    assert installed.returncode == 0, installed.stdout[-1500:] + installed.stderr[-1500:]
    return python


def test_example_is_discovered_in_a_fresh_venv(example_venv):
    out = run([str(example_venv), "-m", "dsv3", "backends"])
    assert out.returncode == 0, out.stderr
    assert "example [dsv3-example-backend]: usable" in out.stdout
    section = out.stdout.split("example [dsv3-example-backend]")[1].split("\n\n")[0]
    for op in ("rms_norm", "silu_and_mul", "linear"):
        assert op in section
    # and it is absent from the environment the tests run in (the venv really is separate)
    assert "dsv3_example_backend" not in sys.modules


def test_example_passes_conformance(example_venv, tmp_path):
    report = tmp_path / "report.json"
    out = run(
        [str(example_venv), "-m", "dsv3", "conformance", "--backend", "example", "--quick", "--json", str(report)]
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "PASS" in out.stdout
    import json

    data = json.loads(report.read_text())
    assert {r["op"] for r in data["rows"]} == {"rms_norm", "silu_and_mul", "linear"}
    assert "rotary" in data["fallbacks"] and "linear[fp8_block/none]" in data["fallbacks"]


def test_example_runs_a_model(example_venv, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", seed=3)
    add_tiny_tokenizer(ckpt)
    out = run(
        [
            str(example_venv),
            "-m",
            "dsv3",
            "run",
            "--backend",
            "example",
            "--ckpt-path",
            str(ckpt),
            "--prompt",
            "the cat sat",
            "--max-new-tokens",
            "4",
            "--temperature",
            "0",
            "--dtype",
            "float32",
            "--output-format",
            "jsonl",
        ]
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "falls back to cpu_ref for: embedding" in out.stderr  # reported, never silent
    import json

    record = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(record["token_ids"]) == 4
