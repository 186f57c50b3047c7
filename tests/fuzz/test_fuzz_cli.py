"""Fuzz the arguments of dsv3 run, convert, eval perplexity, bench (small values), parity and conformance.

Cases go round every (command, flag) pair in turn, each setting that flag to a random value from its pool
(edges of its type: nan, inf, 2**64, negative, empty; paths that are FIFOs, devices, directories,
unrelated non-empty directories, the input itself), a third of them with a second random flag. One case
in six is an argument soup (random flags and tokens, lone surrogates as undecodable argv bytes become)
run in-process: those end in argparse or in the checks before anything is loaded.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from tests.fuzz.cases import TEXT, AreaTimer, copy_base, new_case, run_cli_case
from tests.fuzz.harness import CaseDirs, assert_clean, cases_for

pytestmark = pytest.mark.e2e

AREA = "cli"
NUMBERS = [
    "0",
    "1",
    "2",
    "-1",
    "nan",
    "inf",
    "-inf",
    "1e-300",
    "1e300",
    "x",
    "",
    "1.5",
    str(2**63),
    str(2**64),
    "0x10",
    " 3",
]


def _paths(dirs: CaseDirs, ckpt: Path) -> dict[str, str]:
    """Odd paths a case may pass where a file or directory is expected (built on demand, inside the case)."""
    s = dirs.sandbox
    made = {
        "fifo": s / "fifo",
        "dir": s / "a-dir",
        "victim": s / "victim",  # an unrelated non-empty directory: must survive any --out
        "empty": s / "empty.txt",
        "not-utf8": s / "latin1.txt",
        "file": s / "plain.txt",
        "nul": s / "nul.txt",
        "many-lines": s / "many.txt",
        "long-line": s / "long.txt",
        "bom": s / "bom.txt",
    }
    if not made["fifo"].exists():
        os.mkfifo(made["fifo"])
        made["dir"].mkdir()
        made["victim"].mkdir()
        (made["victim"] / "notes.txt").write_text("keep me")
        made["empty"].write_bytes(b"")
        made["not-utf8"].write_bytes(b"caf\xe9 au lait\n")
        made["file"].write_text(TEXT)
        made["nul"].write_bytes(b"the\x00cat\n")
        made["many-lines"].write_text("the cat\n" * 300)
        made["long-line"].write_text("the cat sat " * 3000 + "\n")
        made["bom"].write_bytes(b"\xef\xbb\xbfthe cat sat\n")
    out = {k: str(v) for k, v in made.items()}
    out.update(
        missing=str(s / "missing"),
        devnull="/dev/null",
        devzero="/dev/zero",
        under_file=str(made["file"]) + "/sub",
        ckpt=str(ckpt),
        ckpt_file=str(ckpt / "model.safetensors"),
        work=str(dirs.work),
        new=str(dirs.work / "new"),
        new_deep=str(dirs.work / "a" / "b" / "c"),
        loop=str(s / "loop"),
    )
    if not (s / "loop").is_symlink():
        (s / "loop").symlink_to("loop")
    return out


def _flags(cmd: str, p: dict[str, str]) -> dict[str, list[str]]:
    """flag -> values to try, for each command."""
    text_paths = [
        p[k]
        for k in (
            "fifo",
            "dir",
            "empty",
            "not-utf8",
            "file",
            "nul",
            "many-lines",
            "long-line",
            "bom",
            "missing",
            "devnull",
            "devzero",
            "loop",
        )
    ]
    ckpt_paths = [p[k] for k in ("ckpt", "missing", "file", "fifo", "dir", "ckpt_file", "devnull", "loop")] + [""]
    model = {
        "--ckpt-path": ckpt_paths,
        "--config": [p["missing"], p["fifo"], p["dir"], p["file"], p["devzero"], "deepseek-v3-671b", "tiny-v3", ""],
        "--backend": ["cpu_ref", "onnxruntime", "amd", "nvidia", "ascend", "nope", "", "../x", "\udcff"],
        "--dtype": ["float32", "bfloat16", "float16", "int8", ""],
        "--attn-impl": ["absorb", "naive", "flash", ""],
        "--act-quant": ["none", "dynamic", "fp8", "x"],
        "--weight-format": ["hp", "fp8_block", "int8_w8a8", "int8_wo", "x"],
    }
    if cmd == "run":
        prompts = [
            "",
            " ",
            "the cat",
            "\udcff\udcfe",
            "\ud800",
            "the " * 300,
            "x" * 100_000,
            "\x00",
            "é😀\u202e",
            "<s></s>",
            "\r\n",
        ]
        return {
            **model,
            "--prompt": prompts,
            "--input-file": text_paths,
            "--max-new-tokens": ["0", "1", "-1", "1000", str(2**63), "x", "1.5"],
            "--temperature": NUMBERS,
            "--top-p": NUMBERS + ["1.0000001", "0.5"],
            "--seed": NUMBERS + [str(2**64 - 1), str(-(2**63) - 1), "9" * 40],
            "--mtp": ["0", "1", "2", "5", "-1", "1000", str(2**63)],
            "--output-format": ["text", "jsonl", "xml"],
            "--chat": [None],
            "--raw": [None],
            "--interactive": [None],
        }
    if cmd == "convert":
        return {
            "--ckpt-path": ckpt_paths,
            "--out": [
                p[k] for k in ("new", "new_deep", "work", "victim", "dir", "file", "under_file", "fifo", "ckpt", "loop")
            ]
            + [""],
            "--to": ["fp8", "int8", "int8-wo", "bf16", "fp16", "fp32", "fp4"],
            "--scale-fmt": ["ue8m0", "x"],
            "--max-shard-size": [
                "0",
                "-1",
                "1",
                "1B",
                "100",
                "abc",
                "5GB",
                "1e3MB",
                "nanGB",
                "infGB",
                "9" * 30 + "GB",
                " 5GB",
                "5 GB",
                "0.5KB",
                "1KiB",
                "",
            ],
            "--force": [None],
        }
    if cmd == "eval":
        return {
            **model,
            "--text-file": text_paths,
            "--context": ["0", "1", "2", "-1", "16", "128", "129", str(10**9), "x"],
            "--stride": ["0", "-1", "1", "1000", "x"],
            "--max-tokens": ["0", "1", "2", "-1", str(10**9)],
            "--batch": ["0", "-1", "1", "1000", str(10**9)],
            "--against": ["cpu_ref", "nope", "onnxruntime"],
            "--against-ckpt-path": ckpt_paths,
            "--against-dtype": ["float32", "bfloat16", "x"],
            "--against-act-quant": ["none", "dynamic", "x"],
            "--mtp": [None],
            "--json": [p["new"] + ".json", p["missing"] + "/r.json", p["dir"], p["fifo"], p["under_file"]],
        }
    if cmd == "bench":
        return {
            **model,
            "--prompt-lens": ["4", "0", "-1", "", "a", "4,,8", "1,2", "200", str(10**9), "2**3"],
            "--batch-sizes": ["1", "0", "-1", "2", "64", "", "x", "1,1,1"],
            "--decode-tokens": ["0", "1", "2", "-1", "200"],
            "--decode-prompt-len": ["0", "1", "4", "-1", "500"],
            "--repeats": ["0", "1", "-1", "x"],
            "--warmup": ["0", "1", "-1"],
            "--mtp": ["0", "1", "0,1", "2", "-1", "x", "100"],
            "--threads": ["1", "0", "-1", "2"],
            "--seed": NUMBERS,
            "--json": [p["new"] + ".json", p["missing"] + "/b.json", p["dir"], p["fifo"]],
        }
    if cmd == "parity":
        return {
            "--backend": ["cpu_ref", "onnxruntime", "amd", "nope", ""],
            "--against": ["cpu_ref", "onnxruntime", "nope"],
            "--ckpt-path": ckpt_paths,
            "--config": [p["missing"], p["fifo"], p["file"], "tiny-v3"],
            "--dtype": ["float32", "bfloat16", "x"],
            "--attn-impl": ["absorb", "naive"],
            "--act-quant": ["none", "dynamic"],
            "--prompt": ["the cat", "", "\ud800", "the " * 300],
            "--tokens": ["1,2,3", "", "a", "-1", "96", "95", "1 " * 300, str(2**63), "1,,2", "1.5"],
            "--rtol": NUMBERS,
            "--json": [p["new"] + ".json", p["missing"] + "/p.json", p["dir"], p["fifo"]],
        }
    if cmd == "conformance":
        return {
            "--backend": ["cpu_ref", "onnxruntime", "amd", "nvidia", "ascend", "nope", ""],
            "--op": ["rms_norm", "embedding", "silu_and_mul", "sample", "nope"],
            "--dtype": ["float32", "bfloat16", "x"],
            "--json": [p["new"] + ".json", p["missing"] + "/c.json", p["dir"], p["fifo"], p["under_file"]],
            "--allow-empty": [None],
            "--verbose": [None],
            "--explain": [None],
        }
    raise ValueError(cmd)


COMMANDS = ("run", "convert", "eval", "bench", "parity", "conformance")
CODES = {"parity": (0, 1), "conformance": (0, 1)}


def _base(cmd: str, p: dict[str, str]) -> list[str]:
    c = p["ckpt"]
    if cmd == "run":
        return [
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
            "0",
        ]
    if cmd == "convert":
        return ["convert", "--ckpt-path", c, "--out", p["new"], "--to", "fp8", "--no-progress"]
    if cmd == "eval":
        return [
            "eval",
            "perplexity",
            "--ckpt-path",
            c,
            "--text-file",
            p["file"],
            "--dtype",
            "float32",
            "--no-progress",
            "--context",
            "16",
            "--max-tokens",
            "40",
        ]
    if cmd == "bench":
        small = [
            "--prompt-lens",
            "4",
            "--batch-sizes",
            "1",
            "--decode-tokens",
            "2",
            "--decode-prompt-len",
            "4",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--mtp",
            "0",
        ]
        return ["bench", "--ckpt-path", c, "--dtype", "float32", *small]
    if cmd == "parity":
        return ["parity", "--backend", "cpu_ref", "--ckpt-path", c, "--tokens", "3 4 5 6"]
    return ["conformance", "--backend", "cpu_ref", "--quick", "--op", "rms_norm"]


def _set(argv: list[str], flag: str, value: str | None) -> list[str]:
    """``argv`` with ``flag`` set to ``value`` (replacing the base's value; None: a switch)."""
    out = list(argv)
    if flag in out and value is not None and out.index(flag) + 1 < len(out):
        out[out.index(flag) + 1] = value
    elif value is None:
        out.append(flag)
    else:
        out += [flag, value]
    if flag in ("--input-file", "--interactive") and "--prompt" in out:  # mutually exclusive with the base's --prompt
        i = out.index("--prompt")
        del out[i : i + 2]
    return out


def _soup(rng: random.Random, p: dict[str, str]) -> list[str]:
    """Random flags and tokens, always ending in an unknown flag: every soup is refused while parsing or
    checking (so none starts a server, a benchmark or an interactive session in this process)."""
    cmd = rng.choice([*COMMANDS, "backends", "nope", ""])
    argv = ["eval", "perplexity"] if cmd == "eval" else [cmd]
    pool = [f for c in COMMANDS for f in _flags(c, p) if f != "--interactive"]
    pool += ["--", "-", "--no-such-flag", "--ckpt-path=", "--prompt=x", "-x"]
    for _ in range(rng.randint(0, 5)):
        argv.append(rng.choice(pool))
        if rng.random() < 0.6:
            argv.append(rng.choice(["x", "", "-1", "nan", "\udcff", "--", "1e999", str(2**70), "\ud800"]))
    return [*argv, "--no-such-flag-\udcff"]


def test_fuzz_cli(bases, case_root):
    pairs = []
    for cmd in COMMANDS:
        for flag in _flags(cmd, _paths_stub()):
            pairs.append((cmd, flag))
    with AreaTimer(AREA):
        for i in range(cases_for(AREA)):
            rng = random.Random(f"{AREA}:{i}")
            dirs = new_case(case_root, AREA, i)
            ckpt = copy_base(bases["plain"], dirs)
            p = _paths(dirs, ckpt)
            if i % 6 == 5:
                argv = _soup(rng, p)
                run_cli_case(AREA, f"[{i}] soup", dirs, argv, (0, 1), inprocess=True)
                continue
            cmd, flag = pairs[(i - i // 6) % len(pairs)]
            flags = _flags(cmd, p)
            argv = _set(_base(cmd, p), flag, rng.choice(flags[flag]))
            if rng.random() < 1 / 3:
                other = rng.choice(sorted(flags))
                argv = _set(argv, other, rng.choice(flags[other]))
            run_cli_case(AREA, f"[{i}] {cmd} {flag}", dirs, argv, CODES.get(cmd, (0,)))
    assert_clean(AREA)


def _paths_stub() -> dict[str, str]:
    """The keys of _paths with placeholder values (to list the flags without building anything)."""
    return dict.fromkeys(
        [
            "fifo",
            "dir",
            "victim",
            "empty",
            "not-utf8",
            "file",
            "nul",
            "many-lines",
            "long-line",
            "bom",
            "missing",
            "devnull",
            "devzero",
            "under_file",
            "ckpt",
            "ckpt_file",
            "work",
            "new",
            "new_deep",
            "loop",
        ],
        "x",
    )
