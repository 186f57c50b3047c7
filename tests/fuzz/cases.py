"""What the CLI-driven areas share: odd values, the commands a checkpoint is tried with, running one case."""

from __future__ import annotations

import random
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from dsv3 import cli
from tests.fuzz import harness
from tests.fuzz.harness import STATS, CaseDirs, check_case, run_forked, run_inprocess, shell_quote, snapshot

#: JSON values of every type and the edges of each: where a config or request expects one thing.
WEIRD = [
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    3,
    7,
    2**31,
    2**63,
    2**64 + 1,
    10**30,
    -(10**30),
    0.0,
    -0.0,
    0.5,
    1.5,
    1e-300,
    1e308,
    float("nan"),
    float("inf"),
    float("-inf"),
    "",
    "abc",
    "1",
    "1e3",
    "\ud800",
    "\u202e\u0000",
    "x" * 5000,
    [],
    [1],
    [1, 2, 3],
    ["a"],
    [None],
    {},
    {"a": 1},
    {"type": "yarn"},
    [[[[[]]]]],
]
TEXT = "the cat sat on the mat and the dog ran on the big mat " * 8


def weird(rng: random.Random, like: object = None) -> object:
    """An odd value; for a number ``like``, half the time a nearby or scaled one (edges a type check lets through)."""
    if isinstance(like, (int, float)) and not isinstance(like, bool) and rng.random() < 0.5:
        return rng.choice(
            [like + 1, like - 1, -like, like * 2, like * 10**6, like // 2 if isinstance(like, int) else like / 2, 0]
        )
    return rng.choice(WEIRD)


def _config_keys(raw: dict) -> list[str]:
    keys = sorted(raw) + [f"rope_scaling.{k}" for k in sorted(raw.get("rope_scaling") or {})]
    return keys + [
        "quantization_config",
        "moe_layer_freq",
        "scoring_func",
        "topk_method",
        "dsv3_train_context",
        "rope_parameters",
    ]


def mutate_config(raw: dict, rng: random.Random, count: int) -> list[str]:
    """Set ``count`` random fields of a config dict to odd values (or delete them); what was done."""
    done = []
    for _ in range(count):
        key = rng.choice(_config_keys(raw))
        parent, leaf = (raw, key) if "." not in key else (raw.setdefault("rope_scaling", {}), key.split(".", 1)[1])
        if not isinstance(parent, dict):
            continue
        if rng.random() < 0.15:
            parent.pop(leaf, None)
            done.append(f"del {key}")
        else:
            parent[leaf] = weird(rng, parent.get(leaf))
            done.append(f"{key}={parent[leaf]!r:.40}")
    return done


def new_case(case_root: Path, area: str, i: int) -> CaseDirs:
    return CaseDirs(case_root / area / f"{i:04d}")


def copy_base(base: Path, dirs: CaseDirs) -> Path:
    """A fresh copy of the base checkpoint ``base`` in the case's sandbox."""
    return Path(shutil.copytree(base, dirs.sandbox / "ckpt", symlinks=True))


def command_on(
    ckpt: Path, dirs: CaseDirs, rng: random.Random, kinds: tuple[str, ...] | None = None
) -> tuple[str, list[str], tuple[int, ...]]:
    """(name, argv, exit codes of a successful run) of a small command that reads ``ckpt``."""
    kinds = kinds or ("run",) * 5 + ("convert",) * 2 + ("eval", "parity")
    kind = rng.choice(kinds)
    c = str(ckpt)
    if kind == "run":
        return (
            kind,
            [
                "run",
                "--ckpt-path",
                c,
                "--dtype",
                "float32",
                "--prompt",
                "the cat sat",
                "--max-new-tokens",
                "3",
                "--temperature",
                "0.8",
                "--seed",
                "1",
            ],
            (0,),
        )
    if kind == "chat":
        return (
            kind,
            [
                "run",
                "--ckpt-path",
                c,
                "--dtype",
                "float32",
                "--chat",
                "--prompt",
                "hello",
                "--max-new-tokens",
                "2",
                "--temperature",
                "0",
            ],
            (0,),
        )
    if kind == "convert":
        to = rng.choice(["fp8", "int8", "bf16", "int8-wo"])
        return kind, ["convert", "--ckpt-path", c, "--out", str(dirs.work / "out"), "--to", to, "--no-progress"], (0,)
    if kind == "eval":
        text = dirs.work / "text.txt"
        text.write_text(TEXT)
        argv = ["eval", "perplexity", "--ckpt-path", c, "--text-file", str(text), "--dtype", "float32"]
        return kind, argv + ["--no-progress", "--context", "16", "--max-tokens", "40"], (0,)
    if kind == "parity":
        return kind, ["parity", "--backend", "cpu_ref", "--ckpt-path", c, "--tokens", "3 4 5 6"], (0, 1)
    raise ValueError(kind)


def run_cli_case(
    area: str,
    name: str,
    dirs: CaseDirs,
    argv: list[str],
    run_codes: tuple[int, ...] = (0,),
    refuse: str | None = None,
    inprocess: bool = False,
    stdin: Path | None = None,
) -> list[str]:
    """Run ``dsv3 argv`` as one case, record what it ended in; the kinds. A failing case keeps its directory."""
    before = snapshot(dirs.sandbox)
    target: Callable[[], int] = lambda: cli.main(list(argv))  # noqa: E731
    if inprocess:
        result = run_inprocess(target, dirs)
    else:
        result = run_forked(target, dirs, stdin=stdin)
    verdict = check_case(dirs, before, result, run_codes, refuse)
    feed = f" < {stdin}" if stdin else ""
    reproducer = (
        f"cd {dirs.work} && HOME={dirs.home} TMPDIR={dirs.tmp} dsv3 {shell_quote(argv)}{feed}"
        f"  (case directory kept: {dirs.root})"
    )
    STATS.record(area, verdict.kinds, f"{name} ({result.seconds:.2f} s)", reproducer, verdict.detail)
    if not set(verdict.kinds) & set(harness.FAILURES):
        dirs.remove()
    return verdict.kinds


class AreaTimer:
    """Adds the wall time of a block to the area's figure."""

    def __init__(self, area: str):
        self.area = area

    def __enter__(self) -> AreaTimer:
        self.start = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        STATS.wall_s[self.area] = STATS.wall_s.get(self.area, 0.0) + time.monotonic() - self.start
