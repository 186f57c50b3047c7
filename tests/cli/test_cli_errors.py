"""``python -m dsv3``: bad input gives one clear line on stderr and exit status 2, never a traceback;
and ``dsv3 run`` works end to end with --output-format jsonl, --input-file and --interactive.

Every error case runs through ``dsv3.cli.main`` in this process (an escaping exception fails the
test just as a traceback would), and one case of each kind also as ``python -m dsv3`` in a
subprocess, as a user runs it: each subprocess pays ~2 s of CPU importing torch, too much for all
twenty on a 2-core CI machine. The subprocesses are started together, a few at a time.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

import dsv3
from dsv3.cli import main as dsv3_main
from tests.helpers import add_tiny_tokenizer, one_torch_thread

GEN = ["--dtype", "float32", "--temperature", "0", "--max-new-tokens", "5"]
INTERACTIVE_STDIN = "the cat sat\n/clear\nhello world\n\n/exit\nthe dog ran\n"
FILE_PROMPTS = ["the cat sat", "hello world", "a big dog ran on the mat"]


class _Unpickled:
    """Unpickling this creates a file: if the marker ever exists, dsv3 ran a pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _edit_config(path: Path, **changes) -> Path:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def _edit_tensor(path: Path, name: str, fn) -> Path:
    tensors = load_file(str(path / "model.safetensors"))
    tensors[name] = fn(tensors[name]).contiguous()
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _error_cases(base: Path, tok: Path, work: Path) -> dict[str, tuple[list[str], list[str]]]:
    """name -> (dsv3 arguments, substrings the one error line must contain). Builds the bad inputs."""
    run = ["run", "--prompt", "the cat", *GEN]
    cases: dict[str, tuple[list[str], list[str]]] = {}

    def add(name: str, ckpt: Path | str, must: list[str], extra: list[str] | None = None, argv=None):
        cases[name] = (argv or [*run, "--ckpt-path", str(ckpt), *(extra or [])], must)

    add("missing-directory", work / "no-such-dir", ["no-such-dir", "not found"])
    empty = work / "no-weights"
    empty.mkdir()
    shutil.copy(base / "config.json", empty)
    add("missing-weights-file", empty, ["no-weights", "model.safetensors"])
    add("missing-config-file", base, ["nope.yaml", "not found"], ["--config", str(work / "nope.yaml")])
    shard = _copy(base, work / "missing-shard")
    index = {"weight_map": {"lm_head.weight": "model-00002-of-00002.safetensors"}}
    (shard / "model.safetensors.index.json").write_text(json.dumps(index))
    add("missing-shard", shard, ["model-00002-of-00002.safetensors", "lm_head.weight"])

    data = (base / "model.safetensors").read_bytes()
    trunc = _copy(base, work / "truncated")
    (trunc / "model.safetensors").write_bytes(data[: len(data) // 2])
    add("truncated-safetensors", trunc, ["truncated/model.safetensors"])
    corrupt = _copy(base, work / "corrupt")
    (corrupt / "model.safetensors").write_bytes(bytes(range(256)) * 16)
    add("corrupt-safetensors", corrupt, ["corrupt/model.safetensors", "safetensors"])

    name = "model.layers.1.self_attn.kv_b_proj.weight"
    shape = _edit_tensor(_copy(base, work / "bad-shape"), name, lambda t: t[:, :-1])
    add("wrong-shape", shape, [name, "shape"])
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    expert = _edit_tensor(_copy(base, work / "bad-expert"), name, lambda t: t[: t.shape[0] // 2])
    add("wrong-shape-one-expert", expert, [name, "shape"])
    name = "model.layers.0.mlp.gate_proj.weight"
    dtype = _edit_tensor(
        _copy(base, work / "int-tensor"), name, lambda t: (t * 100).to(dtype=__import__("torch").int32)
    )
    add("integer-tensor", dtype, [name, "dtype"])

    add(
        "experts-not-divisible",
        _edit_config(_copy(base, work / "c1"), n_routed_experts=9),
        ["n_routed_experts", "n_group"],
    )
    add("topk-group-over-n-group", _edit_config(_copy(base, work / "c2"), topk_group=3), ["topk_group", "n_group"])
    add("top-k-over-experts", _edit_config(_copy(base, work / "c3"), num_experts_per_tok=9), ["num_experts_per_tok"])
    add("field-wrong-type", _edit_config(_copy(base, work / "c4"), q_lora_rank="16"), ["c4/config.json", "q_lora_rank"])
    yaml_bad = work / "bad.yaml"
    yaml_bad.write_text("hidden_size: [unclosed\n")
    add("unparsable-yaml", base, ["bad.yaml"], ["--config", str(yaml_bad)])

    add("unknown-backend", base, ["no_such_backend", "cpu_ref"], ["--backend", "no_such_backend"])
    add("backend-not-usable", base, ["nvidia", "not usable"], ["--backend", "nvidia"])

    pickled = work / "pickled"
    pickled.mkdir()
    shutil.copy(base / "config.json", pickled)
    (pickled / "pytorch_model.bin").write_bytes(pickle.dumps(_Unpickled(str(work / "UNPICKLED"))))
    add("pickled-weights", pickled, ["pytorch_model.bin", "pickle"])

    missing_input = work / "prompts-nowhere.txt"
    add(
        "input-file-missing",
        tok,
        ["prompts-nowhere.txt"],
        argv=["run", "--ckpt-path", str(tok), "--input-file", str(missing_input), *GEN],
    )
    add(
        "prompt-too-long",
        tok,
        ["max_position_embeddings"],
        argv=["run", "--ckpt-path", str(tok), "--prompt", " ".join(["cat"] * 200), *GEN],
    )
    add("no-tokenizer-for-text", base, ["tokenizer"])

    tok_run = ["run", "--ckpt-path", str(tok), *GEN]
    add("temperature-nan", tok, ["--temperature", "nan"], argv=[*tok_run, "--prompt", "hi", "--temperature", "nan"])
    add("temperature-inf", tok, ["--temperature", "inf"], argv=[*tok_run, "--prompt", "hi", "--temperature", "inf"])
    add("seed-past-2**64", tok, ["--seed", str(2**64)], argv=[*tok_run, "--prompt", "hi", "--seed", str(2**64)])
    # a lone surrogate is how Python holds invalid UTF-8 in argv (a subprocess gets the byte 0xff itself)
    add("prompt-not-utf8", tok, ["--prompt #2", "surrogate"], argv=[*tok_run, "--prompt", "hi", "--prompt", "a \udcff"])
    not_utf8 = work / "latin1-prompts.txt"
    not_utf8.write_bytes("the cat\ncaf\u00e9\n".encode("latin-1"))
    add(
        "input-file-not-utf8",
        tok,
        ["latin1-prompts.txt", "not UTF-8", "line 2"],
        argv=[*tok_run, "--input-file", str(not_utf8)],
    )
    return cases


def _dsv3(argv: list[str], stdin: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "dsv3", *argv],
        capture_output=True,
        text=True,
        input=stdin,
        env=env,
        timeout=300,
        cwd=cwd,
    )


def _in_process(argv: list[str]) -> subprocess.CompletedProcess:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = dsv3_main(argv)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def setup(tiny_ckpt, tmp_path_factory):
    """Build every bad input, run every command (4 at a time), and the Python API's expected outputs."""
    work = tmp_path_factory.mktemp("cli")
    tok = add_tiny_tokenizer(_copy(tiny_ckpt, work / "with-tokenizer"))
    cases = _error_cases(tiny_ckpt, tok, work)
    prompts_file = work / "prompts.txt"
    prompts_file.write_text(f"{FILE_PROMPTS[0]}\n\n{FILE_PROMPTS[1]}\n{FILE_PROMPTS[2]}\n")
    jobs = {name: (cases[name][0], None) for name in SUBPROCESS}
    jobs["jsonl"] = (
        [
            "run",
            "--ckpt-path",
            str(tok),
            "--prompt",
            "the cat sat",
            "--prompt",
            "hello world",
            "--output-format",
            "jsonl",
            *GEN,
        ],
        None,
    )
    jobs["input-file"] = (
        ["run", "--ckpt-path", str(tok), "--input-file", str(prompts_file), "--output-format", "jsonl", *GEN],
        None,
    )
    jobs["interactive"] = (["run", "--ckpt-path", str(tok), "--interactive", *GEN], INTERACTIVE_STDIN)
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {name: pool.submit(_dsv3, argv, stdin, work) for name, (argv, stdin) in jobs.items()}
        results = {name: f.result() for name, f in futures.items()}
    gen = one_torch_thread()
    next(gen)
    try:
        in_process = {name: _in_process(argv) for name, (argv, _) in cases.items()}
        engine = dsv3.load(tok, dtype="float32", progress=False)
        expected = {
            p: engine.generate([p], max_new_tokens=5, temperature=0.0)[0]
            for p in {"the cat sat", "hello world", *FILE_PROMPTS}
        }
    finally:
        next(gen, None)
    return {"work": work, "cases": cases, "results": results, "in_process": in_process, "expected": expected}


ERROR_NAMES = [
    "missing-directory",
    "missing-weights-file",
    "missing-config-file",
    "missing-shard",
    "truncated-safetensors",
    "corrupt-safetensors",
    "wrong-shape",
    "wrong-shape-one-expert",
    "integer-tensor",
    "experts-not-divisible",
    "topk-group-over-n-group",
    "top-k-over-experts",
    "field-wrong-type",
    "unparsable-yaml",
    "unknown-backend",
    "backend-not-usable",
    "pickled-weights",
    "input-file-missing",
    "prompt-too-long",
    "no-tokenizer-for-text",
    "temperature-nan",
    "temperature-inf",
    "seed-past-2**64",
    "prompt-not-utf8",
    "input-file-not-utf8",
]


# one of each kind, also run as a real ``python -m dsv3`` process
SUBPROCESS = [
    "missing-directory",
    "corrupt-safetensors",
    "wrong-shape",
    "experts-not-divisible",
    "unknown-backend",
    "pickled-weights",
    "prompt-not-utf8",
]


@pytest.mark.parametrize(
    "name, how", [(n, "in-process") for n in ERROR_NAMES] + [(n, "subprocess") for n in SUBPROCESS]
)
def test_bad_input_gives_one_clear_line(setup, name, how):
    _, must = setup["cases"][name]
    proc = setup["in_process" if how == "in-process" else "results"][name]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("dsv3: error: ")
    for text in must:
        assert text in lines[0], f"{text!r} not named in: {lines[0]}"
    assert proc.stdout == ""  # nothing half-written


def test_every_error_case_is_checked(setup):
    assert sorted(setup["cases"]) == sorted(ERROR_NAMES)


def test_pickled_weights_are_never_unpickled(setup):
    assert setup["results"]["pickled-weights"].returncode == 2
    assert setup["in_process"]["pickled-weights"].returncode == 2
    assert not (setup["work"] / "UNPICKLED").exists()


def test_backend_not_usable_says_why(setup):
    line = setup["in_process"]["backend-not-usable"].stderr.strip()
    reason = line.split("not usable", 1)[1].lstrip(" :")
    assert len(reason.split()) >= 2, line  # a reason, not just the verdict


def _records(proc: subprocess.CompletedProcess) -> list[dict]:
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_run_jsonl_prints_one_object_per_prompt(setup):
    records = _records(setup["results"]["jsonl"])
    assert [r["prompt"] for r in records] == ["the cat sat", "hello world"]
    for r in records:
        want = setup["expected"][r["prompt"]]
        assert {"prompt", "completion", "token_ids"} <= set(r)
        assert r["token_ids"] == want.token_ids and r["completion"] == want.text
        assert 1 <= len(r["token_ids"]) <= 5 and all(isinstance(i, int) for i in r["token_ids"])


def test_run_input_file_one_prompt_per_line(setup):
    records = _records(setup["results"]["input-file"])
    assert [r["prompt"] for r in records] == FILE_PROMPTS  # the blank line is skipped, order kept
    assert [r["token_ids"] for r in records] == [setup["expected"][p].token_ids for p in FILE_PROMPTS]


def test_run_interactive_with_clear_and_exit(setup):
    proc = setup["results"]["interactive"]
    assert proc.returncode == 0, proc.stderr[-2000:]
    # five prompts shown: two questions, /clear, the empty line, /exit; "the dog ran" after /exit is never read
    assert proc.stdout.count(">>> ") == 5
    answers = [line for line in proc.stdout.replace(">>> ", "\n").splitlines() if line.strip()]
    want = [setup["expected"][p].text for p in ("the cat sat", "hello world")]
    assert answers == [w for w in want if w.strip()]


def test_run_top_p_that_keeps_no_token_is_greedy(setup):
    """--top-p 1e-300 (0 in float32) keeps the most likely token; before, torch.multinomial raised."""
    tok = setup["work"] / "with-tokenizer"
    argv = ["run", "--ckpt-path", str(tok), "--prompt", "the cat sat", "--output-format", "jsonl", *GEN]
    proc = _in_process([*argv, "--temperature", "1", "--top-p", "1e-300", "--seed", "3"])
    assert [r["token_ids"] for r in _records(proc)] == [setup["expected"]["the cat sat"].token_ids]


def test_run_interactive_refuses_a_line_that_is_not_utf8_and_goes_on(setup, monkeypatch):
    tok = setup["work"] / "with-tokenizer"
    stdin = io.TextIOWrapper(io.BytesIO(b"the cat sat\n\xff\xfe\nhello world\n/exit\n"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdin", stdin)
    proc = _in_process(["run", "--ckpt-path", str(tok), "--interactive", *GEN])
    assert proc.returncode == 0
    assert proc.stderr.strip().splitlines() == [
        "dsv3: error: that line is not valid Unicode: a lone surrogate '\\udcff' at character 0 "
        "(invalid UTF-8, or an unpaired \\ud800-\\udfff escape)"
    ]
    answers = [line for line in proc.stdout.replace(">>> ", "\n").splitlines() if line.strip()]
    assert answers == [setup["expected"][p].text for p in ("the cat sat", "hello world") if setup["expected"][p].text]
