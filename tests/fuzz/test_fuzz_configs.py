"""Fuzz the config files given with --config: JSON and YAML with odd field values, YAML's own corners
(python tags that would run code, alias bombs, recursive anchors, several documents, dates, sets),
files that are not text or not files, and built-in config names, each with the tiny checkpoint's weights
through dsv3 run, eval perplexity, parity or bench in a forked child.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from tests.fuzz.cases import AreaTimer, command_on, copy_base, mutate_config, new_case, run_cli_case
from tests.fuzz.harness import CaseDirs, assert_clean, cases_for

pytestmark = pytest.mark.e2e

AREA = "configs"
BENCH = ["--prompt-lens", "4", "--batch-sizes", "1", "--decode-tokens", "2", "--decode-prompt-len", "4"]
BENCH += ["--repeats", "1", "--warmup", "0", "--mtp", "0"]


def _yaml_specials(marker: Path) -> list[str]:
    m = str(marker)
    return [
        f"!!python/object/apply:os.system ['touch {m}']",
        f"model_type: !!python/object/apply:builtins.exec [\"open('{m}', 'w')\"]",
        f"hidden_size: !!python/name:os.system\nx: !!python/object/new:subprocess.Popen [['touch', '{m}']]",
        "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n"
        + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True))
        + "vocab_size: *i\n",
        "a: &a [*a]\nrope_scaling: *a\n",  # a recursive anchor (yaml builds a list that holds itself)
        "x: &x {}\nrope_scaling: &r {<<: *x, factor: *r}\n",
        "vocab_size: 96\n---\nvocab_size: 97\n",
        "vocab_size:\t96\n",
        "- 1\n- 2\n",
        "just a string",
        "",
        "# only a comment\n",
        "vocab_size: 0x60\nhidden_size: 0b100000\nrope_theta: .inf\nrms_norm_eps: .nan\n",
        "torch_dtype: 2024-01-01\nrope_theta: 1e4\nmodel_type: !!binary aGVsbG8=\n",
        "rope_scaling: !!set {a, b}\n",
        "vocab_size: 96\nvocab_size: 97\n",
        "num_hidden_layers: 1" + "0" * 5000 + "\n",
        "\xff\xfe",
        "{" * 10_000,
    ]


Writer = Callable[[CaseDirs, dict, random.Random], tuple[Path | str, str]]


def _json_fields(dirs: CaseDirs, raw: dict, rng: random.Random) -> tuple[Path, str]:
    done = mutate_config(raw, rng, rng.randint(1, 3))
    path = dirs.sandbox / "config.json"
    path.write_text(json.dumps(raw))
    return path, "json " + ", ".join(done)


def _yaml_fields(dirs: CaseDirs, raw: dict, rng: random.Random) -> tuple[Path, str]:
    done = mutate_config(raw, rng, rng.randint(1, 3))
    path = dirs.sandbox / rng.choice(["config.yaml", "config.yml"])
    path.write_text(yaml.safe_dump(raw, allow_unicode=rng.random() < 0.5))
    return path, "yaml " + ", ".join(done)


def _yaml_special(dirs: CaseDirs, raw: dict, rng: random.Random) -> tuple[Path, str]:
    text = rng.choice(_yaml_specials(dirs.marker))
    path = dirs.sandbox / "config.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    return path, f"yaml text {text[:60]!r}"


def _file_kind(dirs: CaseDirs, raw: dict, rng: random.Random) -> tuple[Path | str, str]:
    how = rng.choice(
        ["fifo", "directory", "missing", "empty", "not-utf8", "bom", "sparse", "dev-zero", "toml", "no-suffix"]
    )
    path = dirs.sandbox / ("config.toml" if how == "toml" else "cfg" if how == "no-suffix" else "config.json")
    if how == "fifo":
        os.mkfifo(path)
    elif how == "directory":
        path.mkdir()
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "not-utf8":
        path.write_bytes(json.dumps(raw).encode().replace(b"deepseek", b"deeps\xe9ek"))
    elif how == "bom":
        path.write_bytes(b"\xef\xbb\xbf" + json.dumps(raw).encode())
    elif how == "sparse":
        path.write_text(json.dumps(raw))
        os.truncate(path, 2**40)
    elif how == "dev-zero":
        path.symlink_to("/dev/zero")
    elif how in ("toml", "no-suffix"):
        path.write_text(json.dumps(raw))
    return path, f"--config is {how}"


def _builtin(dirs: CaseDirs, raw: dict, rng: random.Random) -> tuple[str, str]:
    name = rng.choice(
        [
            "deepseek-v3-671b",
            "deepseek-v2-236b",
            "deepseek-v2-lite-16b",
            "tiny-v2",
            "tiny-v3",
            "nope",
            "../etc/passwd",
            ".",
        ]
    )
    return name, f"built-in config name {name!r}"


def _same(dirs: CaseDirs, raw: dict, rng: random.Random) -> tuple[Path, str]:
    """The checkpoint's own config, as JSON or YAML: must run."""
    if rng.random() < 0.5:
        path = dirs.sandbox / "same.json"
        path.write_text(json.dumps(raw))
    else:
        path = dirs.sandbox / "same.yaml"
        path.write_text(yaml.safe_dump(raw))
    return path, "the checkpoint's own config"


WRITERS: list[Writer] = [
    _json_fields,
    _yaml_fields,
    _json_fields,
    _yaml_special,
    _file_kind,
    _builtin,
    _same,
    _json_fields,
]


def test_fuzz_configs(bases, case_root):
    raw_base = json.loads((bases["plain"] / "config.json").read_text())
    with AreaTimer(AREA):
        for i in range(cases_for(AREA)):
            rng = random.Random(f"{AREA}:{i}")
            dirs = new_case(case_root, AREA, i)
            ckpt = copy_base(bases["plain"], dirs)
            writer = WRITERS[i % len(WRITERS)]
            config, described = writer(dirs, json.loads(json.dumps(raw_base)), rng)
            kinds = ("run", "run", "run", "eval", "parity", "bench")
            cmd = rng.choice(kinds)
            if cmd == "bench":
                argv, codes = ["bench", "--ckpt-path", str(ckpt), "--dtype", "float32", *BENCH], (0,)
            else:
                cmd, argv, codes = command_on(ckpt, dirs, rng, (cmd,))
            argv += ["--config", str(config)]
            run_cli_case(AREA, f"[{i}] {writer.__name__}: {described} | dsv3 {cmd}", dirs, argv, codes)
    assert_clean(AREA)
