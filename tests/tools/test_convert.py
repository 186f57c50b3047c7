"""``dsv3 convert`` on tiny checkpoints: the outputs load and run, round trips stay within each
format's bound, the input is never touched and a failed conversion leaves nothing behind.

Bounds (see tests/model/test_quant_format.py and docs/quantization.md): fp8 block
``|w - w'| <= max(2^-4 |w|, 2^-10 s)``, int8 ``|w - w'| <= s / 2``, plus ``2^-8 |w'|`` for the
final bf16 rounding. Logits of a quantized conversion against its BF16 source (weights only,
--act-quant none): fp8 relative RMS <= 0.15 (per-element weight error RMS ~2.7%, observed ~0.07),
int8 <= 0.05 (observed ~0.02).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import resource
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import traceback
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

import dsv3
from dsv3 import cli
from dsv3.errors import Dsv3Error
from dsv3.quantize import expand_blocks
from dsv3.tools import convert as conv
from tests.helpers import QUANT_SHAPES, make_checkpoint, quantize_checkpoint

TOKENS = torch.randint(0, 96, (2, 8), generator=torch.Generator().manual_seed(1))


def _add_tokenizer(path) -> None:
    """A word-level tokenizer over the tiny vocabulary (ids 0/1 are bos/eos, as in TINY)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<s>", "</s>", "<unk>", "hello", "world"] + [f"w{i}" for i in range(5, 96)]
    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(path))


def _fingerprint(path):
    return {p.name: (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(path.iterdir())}


def _tensors(path):
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A BF16 checkpoint (what a BF16 release looks like) with a tokenizer, and its fingerprint."""
    root = tmp_path_factory.mktemp("convert")
    fp32 = make_checkpoint(root / "fp32", seed=2, mtp=True, **QUANT_SHAPES)
    _add_tokenizer(fp32)
    bf16 = quantize_checkpoint(fp32, root / "bf16", "bf16")
    return bf16, _fingerprint(bf16)


@pytest.fixture(scope="module")
def fp8(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("fp8") / "ckpt"
    assert cli.main(["convert", "--ckpt-path", str(src[0]), "--out", str(out), "--to", "fp8", "--no-progress"]) == 0
    return out


def _logits(path, act_quant="none"):
    return dsv3.load(path, dtype="float32", act_quant=act_quant, progress=False).logits(TOKENS)


def _rel_rms(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_bf16_to_fp8_writes_the_released_layout(src, fp8):
    cfg = json.loads((fp8 / "config.json").read_text())
    assert cfg["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    t, s = _tensors(fp8), _tensors(src[0])
    for name, value in s.items():
        if conv.is_quantized_projection(name):
            assert t[name].dtype == torch.float8_e4m3fn, name
            sc = t[name[: -len("weight")] + "weight_scale_inv"]
            assert sc.dtype == torch.float32 and sc.shape == (-(-value.shape[0] // 128), -(-value.shape[1] // 128))
        else:  # norms, embeddings, lm_head, router gate and bias, eh_proj, shared_head: copied byte for byte
            assert torch.equal(t[name], value) and t[name].dtype == value.dtype, name
    assert "model.layers.3.eh_proj.weight_scale_inv" not in t and "lm_head.weight_scale_inv" not in t
    assert "model.layers.3.self_attn.kv_b_proj.weight_scale_inv" in t, "MTP layer projections are quantized"
    assert (fp8 / "tokenizer.json").read_bytes() == (src[0] / "tokenizer.json").read_bytes()
    err = _rel_rms(_logits(fp8), _logits(src[0]))
    assert 0 < err <= 0.15, err


def test_fp8_to_bf16_loads_anywhere_and_runs(src, fp8, tmp_path):
    out = tmp_path / "bf16"
    assert cli.main(["convert", "--ckpt-path", str(fp8), "--out", str(out), "--to", "bf16", "--no-progress"]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    t = _tensors(out)
    assert not any(k.endswith(("_scale_inv", "_scale")) for k in t)
    assert all(v.dtype != torch.float8_e4m3fn for v in t.values())
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (src[0] / name).read_bytes(), name
    engine = dsv3.load(out, dtype="bfloat16", progress=False)
    [done] = engine.generate(["hello world"], max_new_tokens=4, temperature=0.0)
    assert engine.tokenizer is not None and len(done.token_ids) >= 1 and isinstance(done.text, str)


def test_round_trip_bf16_fp8_bf16_within_bound(src, fp8, tmp_path):
    back = _tensors(quantize_checkpoint(fp8, tmp_path / "back", "bf16"))
    q, s = _tensors(fp8), _tensors(src[0])
    checked = 0
    for name, w in s.items():
        if not conv.is_quantized_projection(name):
            assert torch.equal(back[name], w)
            continue
        w, w2 = w.float(), back[name].float()
        scale = expand_blocks(q[name[: -len("weight")] + "weight_scale_inv"], *w.shape)
        bound = torch.maximum(2.0**-4 * w.abs(), 2.0**-10 * scale) + 2.0**-8 * w2.abs() + 2.0**-21 * w.abs()
        assert bool(((w2 - w).abs() <= bound).all()), name
        checked += 1
    assert checked > 30


def test_round_trip_bf16_int8_within_half_a_step_and_runs(src, tmp_path):
    i8 = quantize_checkpoint(src[0], tmp_path / "int8", "int8")
    cfg = json.loads((i8 / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "int8"
    assert cfg["quantization_config"]["activation_scheme"] == "dynamic"
    q, s = _tensors(i8), _tensors(src[0])
    back = _tensors(quantize_checkpoint(i8, tmp_path / "back", "bf16"))
    for name, w in s.items():
        if conv.is_quantized_projection(name):
            scale = q[name[: -len("weight")] + "weight_scale"]
            assert q[name].dtype == torch.int8 and scale.shape == w.shape[:1]
            w, w2 = w.float(), back[name].float()
            bound = scale.unsqueeze(-1) / 2 + 2.0**-8 * w2.abs() + 2.0**-21 * w.abs()
            assert bool(((w2 - w).abs() <= bound).all()), name
    ref = _logits(src[0])
    err = _rel_rms(_logits(i8), ref)
    assert 0 < err <= 0.05, err
    assert _rel_rms(_logits(i8, "dynamic"), ref) <= 0.05


def test_fp8_to_int8(fp8, tmp_path):
    i8 = quantize_checkpoint(fp8, tmp_path / "int8", "int8")
    assert _rel_rms(_logits(i8), _logits(fp8)) <= 0.05


def test_sharded_output_has_an_index_and_loads_identically(fp8, tmp_path):
    out = quantize_checkpoint(fp8, tmp_path / "sharded", "int8", max_shard_size="300KB")
    single = quantize_checkpoint(fp8, tmp_path / "single", "int8")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(out.glob("*.safetensors"))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"].values()) == {f.name for f in files}
    sizes = {}
    for f in files:
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                t = h.get_tensor(k)
                sizes[f.name] = sizes.get(f.name, 0) + t.numel() * t.element_size()
                assert index["weight_map"][k] == f.name
    assert index["metadata"]["total_size"] == sum(sizes.values())
    assert all(size <= 300_000 for size in sizes.values())  # no single item here exceeds the limit
    for k, fname in index["weight_map"].items():  # a weight and its scale are never split apart
        if k.endswith("weight_scale"):
            assert index["weight_map"][k[: -len("_scale")]] == fname
    assert torch.equal(_logits(out), _logits(single))


def test_input_is_never_modified(src, fp8, tmp_path):
    quantize_checkpoint(src[0], tmp_path / "again", "fp8", scale_fmt="ue8m0")
    assert _fingerprint(src[0]) == src[1]


# ----------------------------------------------------------------- refusals and failures


def _tree(path: Path) -> dict:
    """Every entry under ``path`` (itself included): mode, and the bytes of files or the target of links."""
    out = {}
    for p in [path, *sorted(path.rglob("*"))]:
        st = p.lstat()
        body = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
        out[str(p.relative_to(path))] = (stat.S_IFMT(st.st_mode), st.st_mode & 0o7777, body)
    return out


def _convert_cli(src, out, *extra) -> list[str]:
    return ["convert", "--ckpt-path", str(src), "--out", str(out), "--to", "int8", "--no-progress", *extra]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dsv3: error: "), err
    return err[0]


def test_refuses_to_write_over_or_around_its_input(src):
    s = src[0]
    for out in (s, s / "sub", s.parent, Path("/")):
        with pytest.raises(Dsv3Error, match="--out .*(is the input|contains the input)"):
            conv.convert_checkpoint(s, out, "int8", force=True, progress=False)
    assert _fingerprint(s) == src[1]


@pytest.mark.parametrize("target", ["outside", "/dev/urandom"])
def test_a_side_file_linking_out_is_refused_before_anything_is_written(src, tmp_path, target):
    """Found by tests/fuzz: generation_config.json linking out of the checkpoint was copied into the
    output (its content read from outside), and one linking to a device was silently left out."""
    ckpt = Path(shutil.copytree(src[0], tmp_path / "ckpt"))
    if target == "outside":
        target = tmp_path / "elsewhere.json"
        Path(target).write_text("{}")
    (ckpt / "generation_config.json").unlink(missing_ok=True)
    (ckpt / "generation_config.json").symlink_to(target)
    out = tmp_path / "out"
    with pytest.raises(Dsv3Error, match="generation_config.json: (leads outside the checkpoint|not a regular file)"):
        conv.convert_checkpoint(ckpt, out, "int8", progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["ckpt", "elsewhere.json"][: 1 + (target != "/dev/urandom")]
    )


def test_a_dangling_link_inside_the_checkpoint_is_skipped(src, tmp_path):
    """A partial snapshot's README.md -> a blob not downloaded: nothing to copy, nothing read outside."""
    ckpt = Path(shutil.copytree(src[0], tmp_path / "ckpt"))
    (ckpt / "README.md").symlink_to(ckpt / "not-downloaded")
    out = tmp_path / "out"
    conv.convert_checkpoint(ckpt, out, "int8", progress=False)
    assert (out / "config.json").is_file() and not (out / "README.md").exists()


def _home(d: Path) -> None:
    d.mkdir()
    (d / ".bashrc").write_text("export PATH\n")
    (d / "Documents").mkdir()
    (d / "Documents" / "thesis.tex").write_text("chapter 1")
    (d / "notes.txt").write_text("mine")


def _checkpoint_with_a_subdirectory(d: Path) -> None:
    shutil.copytree(make_checkpoint(d.parent / "tiny"), d)
    (d / "figures").mkdir()
    (d / "figures" / "plot.png").write_bytes(b"\x89PNG")


def _config_and_notes(d: Path) -> None:
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "notes.txt").write_text("not a checkpoint")


def _checkpoint_and_a_symlink(d: Path) -> None:
    shutil.copytree(make_checkpoint(d.parent / "tiny"), d)
    (d / "tokenizer.json").symlink_to(d.parent / "elsewhere")


@pytest.mark.parametrize(
    "make, why",
    [
        (_home, "holds .bashrc, which is not part of a checkpoint"),
        (_checkpoint_with_a_subdirectory, "holds figures, which is not a regular file"),
        (_config_and_notes, "holds notes.txt, which is not part of a checkpoint"),
        (_checkpoint_and_a_symlink, "holds tokenizer.json, which is not a regular file"),
    ],
)
def test_force_refuses_a_directory_that_is_not_a_checkpoint_and_leaves_it(src, tmp_path, capsys, make, why):
    """Before: --force renamed any non-empty --out away and deleted it."""
    victim = tmp_path / "victim"
    make(victim)
    before = _tree(victim)
    capsys.readouterr()
    assert cli.main(_convert_cli(src[0], victim)) == 2
    assert "exists and is not empty (pass --force" in _one_error_line(capsys)
    assert cli.main(_convert_cli(src[0], victim, "--force")) == 2
    line = _one_error_line(capsys)
    assert line == (f"dsv3: error: --out {victim}: {why}; --force replaces only a checkpoint or a dsv3 convert output")
    assert _tree(victim) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary directory left"


def test_force_replaces_a_checkpoint_or_its_own_output(src, tmp_path, capsys):
    with_notes = tmp_path / "src"
    shutil.copytree(src[0], with_notes)
    (with_notes / "eval-notes.docx").write_bytes(b"copied as a side file")
    out = tmp_path / "out"
    assert cli.main(_convert_cli(with_notes, out)) == 0
    marker = json.loads((out / conv.MARKER).read_text())
    assert marker["written_by"] == "dsv3 convert" and marker["state"] == "complete" and marker["to"] == "int8"
    assert "eval-notes.docx" in marker["files"] and "model.safetensors" in marker["files"]
    assert cli.main(_convert_cli(with_notes, out, "--force")) == 0, "what dsv3 wrote, it may replace"

    (out / "results.csv").write_text("a user's file, added later")
    capsys.readouterr()
    assert cli.main(_convert_cli(with_notes, out, "--force")) == 2
    assert "holds results.csv, which is not part of a checkpoint" in _one_error_line(capsys)
    assert (out / "results.csv").exists()

    downloaded = tmp_path / "downloaded"  # a checkpoint dsv3 did not write: config, weights, tokenizer, README
    shutil.copytree(src[0], downloaded)
    (downloaded / "README.md").write_text("model card")
    assert cli.main(_convert_cli(src[0], downloaded, "--force")) == 0
    assert not (downloaded / "README.md").exists() and (downloaded / conv.MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloaded", "out", "src"]
    assert _fingerprint(src[0]) == src[1]


def _partial(parent: Path, out_name: str, tag: str, marker: dict | None) -> Path:
    d = parent / f".{out_name}.{tag}.partial"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"half a shard")
    if marker is not None:
        (d / conv.MARKER).write_text(json.dumps(marker))
    return d


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", ""])
    child.wait()
    return child.pid


def test_stale_partial_of_a_dead_conversion_is_removed_and_nothing_else(src, tmp_path, capsys):
    """Before: every interrupted conversion left a hidden ``.OUT.*.partial`` directory for ever."""
    host = socket.gethostname()
    mark = {"written_by": "dsv3 convert", "state": "partial", "host": host}
    stale = _partial(tmp_path, "out", "dead", {**mark, "pid": _dead_pid()})
    keep = [
        _partial(tmp_path, "out", "nomarker", None),
        _partial(tmp_path, "out", "alive", {**mark, "pid": os.getpid()}),
        _partial(tmp_path, "out", "otherhost", {**mark, "pid": _dead_pid(), "host": host + "-elsewhere"}),
        _partial(tmp_path, "out", "foreign", {**mark, "pid": _dead_pid(), "written_by": "someone else"}),
        _partial(tmp_path, "other", "dead", {**mark, "pid": _dead_pid()}),  # another output's: not this run's
    ]
    before = {d.name: _tree(d) for d in keep}
    assert cli.main(_convert_cli(src[0], tmp_path / "out")) == 0
    assert f"removed {stale}, left by an interrupted conversion" in capsys.readouterr().err
    assert not stale.exists()
    assert {d.name: _tree(d) for d in keep} == before


def _in_child(fn) -> tuple[int, str]:
    """Run ``fn()`` (an exit code) in a forked child: its exit status (-N for signal N) and its stderr."""
    with tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 70
            try:
                os.dup2(err.fileno(), 2)
                sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
                code = fn()
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        err.seek(0)
        return os.waitstatus_to_exitcode(status), err.read().decode(errors="replace")


def test_a_killed_conversion_is_cleaned_up_by_the_next_run(src, tmp_path):
    out = tmp_path / "out"

    def killed_mid_write():
        def die(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        conv.save_file = die
        return cli.main(_convert_cli(src[0], out))

    status, _ = _in_child(killed_mid_write)
    assert status == -signal.SIGKILL
    [partial] = tmp_path.iterdir()
    assert partial.name.startswith(".out.") and partial.name.endswith(".partial")
    assert json.loads((partial / conv.MARKER).read_text())["state"] == "partial"
    assert cli.main(_convert_cli(src[0], out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize(
    "failure",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
    ids=["oserror", "safetensors"],
)
def test_a_full_disk_is_one_line_and_leaves_nothing(src, tmp_path, monkeypatch, capsys, failure):
    real_save = conv.save_file
    calls = []

    def disk_full_on_second_shard(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise failure
        real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(conv, "save_file", disk_full_on_second_shard)
    out = tmp_path / "new" / "out"
    assert cli.main(_convert_cli(src[0], out, "--max-shard-size", "200KB")) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"dsv3: error: --out {out}: ")
    assert line.endswith("No space left on device; nothing was written")
    assert len(calls) == 2, "the first shard was written before the failure"
    assert list(tmp_path.iterdir()) == [], "no output, no temporary directory, no parent it created"

    old = tmp_path / "old"  # with --force, the previous output survives a failed replacement
    assert cli.main(_convert_cli(src[0], old, "--to", "bf16")) == 0
    before = _tree(old)
    capsys.readouterr()
    calls.clear()
    assert cli.main(_convert_cli(src[0], old, "--max-shard-size", "200KB", "--force")) == 2
    assert "No space left on device" in _one_error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"] and _tree(old) == before
    assert _fingerprint(src[0]) == src[1]


def test_a_file_size_limit_is_one_line_and_leaves_nothing(src, tmp_path):
    """RLIMIT_FSIZE: SIGXFSZ would kill the process; the conversion turns it into EFBIG and one line.

    CPython ignores SIGXFSZ at start-up, but a program embedding dsv3 may not: the child restores the
    default (kill) first, and checks that the conversion puts it back afterwards.
    """
    out = tmp_path / "out"

    def convert_under_a_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_DFL)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # the output is ~1.6 MB
        code = cli.main(_convert_cli(src[0], out))
        if signal.getsignal(signal.SIGXFSZ) != signal.SIG_DFL:
            print("SIGXFSZ disposition not restored", file=sys.stderr)
        return code

    status, err = _in_child(convert_under_a_limit)
    assert status == 2, err
    assert err.strip().splitlines() == [
        f"dsv3: error: --out {out}: {out / 'model.safetensors'}: File too large "
        "(the file size limit, see ulimit -f); nothing was written"
    ]
    assert list(tmp_path.iterdir()) == []


def test_out_under_a_regular_file_is_one_line(src, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    for out in (tmp_path / "a_file" / "sub", tmp_path / "a_file" / "x" / "sub"):
        assert cli.main(_convert_cli(src[0], out)) == 2
        assert _one_error_line(capsys) == f"dsv3: error: --out {out}: {tmp_path / 'a_file'} is not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"] and (tmp_path / "a_file").read_text() == "x"


def test_out_in_a_read_only_directory_is_one_line(src, tmp_path):
    """Run in a child as an unprivileged user when the tests run as root (root writes anywhere)."""
    shutil.copytree(src[0], tmp_path / "src")
    for f in (tmp_path / "src").iterdir():
        f.chmod(0o644)  # readable by the unprivileged user
    for d in (tmp_path / "ro", tmp_path / "ro" / "sub"):
        d.mkdir()
    for d in (tmp_path / "ro" / "sub", tmp_path / "ro"):
        d.chmod(0o555)
    tmp_path.chmod(0o755)

    def convert_read_only():
        os.chdir(tmp_path)  # relative paths: the unprivileged user cannot search pytest's root-only parents
        if os.geteuid() == 0:
            try:
                os.setgid(65534)
                os.setuid(65534)
            except PermissionError:
                return 77
        codes = [cli.main(_convert_cli("src", out)) for out in ("ro/out", "ro/sub/new/out")]
        return 2 if codes == [2, 2] else 1

    try:
        status, err = _in_child(convert_read_only)
    finally:
        for d in (tmp_path / "ro", tmp_path / "ro" / "sub"):
            d.chmod(0o755)
    if status == 77:
        pytest.skip("running as root without the right to switch to an unprivileged user")
    assert status == 2, err
    assert err.strip().splitlines() == [
        "dsv3: error: --out ro/out: cannot create a directory in ro: Permission denied",
        "dsv3: error: --out ro/sub/new/out: cannot create ro/sub/new: Permission denied",
    ]
    assert sorted(p.name for p in (tmp_path / "ro").iterdir()) == ["sub"]
    assert list((tmp_path / "ro" / "sub").iterdir()) == []


def test_cli_reports_bad_arguments_on_one_line(src, tmp_path, capsys):
    code = cli.main(
        ["convert", "--ckpt-path", str(src[0]), "--out", str(tmp_path / "x"), "--to", "bf16"]
        + [
            "--scale-fmt",
            "ue8m0",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "dsv3: error: --scale-fmt applies to --to fp8 only"
    assert (
        cli.main(["convert", "--ckpt-path", str(tmp_path / "nope"), "--out", str(tmp_path / "y"), "--to", "fp8"]) == 2
    )
    assert "checkpoint directory not found" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_corrupt_input_shard_fails_clearly_and_writes_nothing(src, tmp_path):
    sharded = quantize_checkpoint(src[0], tmp_path / "sharded", "bf16", max_shard_size="400KB")
    victim = sorted(sharded.glob("*.safetensors"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = _fingerprint(sharded)
    out = tmp_path / "out"
    with pytest.raises(Dsv3Error, match=rf"{victim.name}: not a readable safetensors file"):
        conv.convert_checkpoint(sharded, out, "int8", progress=False)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sharded"]
    assert _fingerprint(sharded) == before


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda t, n: t.pop(n + "_scale_inv"), r"missing scale tensor .* F8_E4M3 weight model\.layers\.0\.self_attn"),
        (
            lambda t, n: t.__setitem__(n + "_scale_inv", torch.ones(3, 3)),
            r"scale tensor .*q_a_proj\.weight_scale_inv has shape \[3, 3\], expected \[2, 2\]",
        ),
    ],
)
def test_bad_scales_in_the_input_are_named(fp8, tmp_path, edit, message):
    import shutil

    from safetensors.torch import save_file

    bad = tmp_path / "bad"
    shutil.copytree(fp8, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    edit(tensors, "model.layers.0.self_attn.q_a_proj.weight")
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(Dsv3Error, match=message):
        conv.convert_checkpoint(bad, tmp_path / "out", "bf16", progress=False)
    assert not (tmp_path / "out").exists()
