"""Tensor + expert parallelism on CPU with gloo: 2 and 4 processes give exactly the tokens of 1.

The test launches torchrun (``python -m torch.distributed.run --standalone``, a free port each
time) on this very file: under torchrun it is the worker (see ``_worker``), which loads each tiny
checkpoint with its rank's shard, generates, and writes what it saw to ``rank<r>.json``. The 1-process
reference runs in the pytest process. Compute is float32 so that the only difference between the
runs is the order of the partial sums (all-reduce of row-parallel linears and of expert outputs):
greedy tokens must match exactly, logits to 1e-4 (fp32 sums of ~100 terms of size ~1).

Checkpoints: a BF16 one (the TINY shapes: 4 heads, 8 experts, vocab 96) and an FP8 one (released
format, made by ``dsv3.tools.convert``) whose shapes put every per-rank split on a 128 block boundary at
world sizes 2 and 4; both with an MTP layer, decoded with and without ``mtp`` speculative drafts.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.model.parallel import ParallelContext
from dsv3.runtime.distributed import init_from_env

pytestmark = pytest.mark.e2e

TIMEOUT_S = 300  # a hang (a rank stuck in a collective) fails the test instead of blocking CI
PROMPTS = [[0, 5, 9, 12, 40, 41, 7], [0, 33, 2, 17]]
NEW_TOKENS = 6
MTP_DRAFTS = 2
TOL = 1e-4

# Per-rank splits of these shapes are multiples of 128 at world sizes 1, 2 and 4: 8 heads x (64 nope + 64
# rope) = 1024 query rows, 8 x (64 + 64 v) = 1024 kv_b rows, 8 x 64 = 512 o_proj columns, dense and
# shared-expert intermediate 512. kv_lora_rank 256 makes 2C + R (576) > Dqk + Dv (192): prefills take the
# naive form, through the FP8 kv_b split by heads (the TINY checkpoint covers it in BF16).
WIDE_FP8 = dict(
    hidden_size=64,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=32,
    kv_lora_rank=256,
    qk_nope_head_dim=64,
    qk_rope_head_dim=64,
    v_head_dim=64,
    intermediate_size=512,
    moe_intermediate_size=128,
    n_shared_experts=4,
)


# ------------------------------------------------------------------ what every run computes
def run_cases(engine) -> dict:
    """Greedy and seeded sampled tokens (plain and with MTP drafts), full logits and MTP draft logits."""
    out = {
        "greedy": [c.token_ids for c in engine.generate(PROMPTS, NEW_TOKENS, temperature=0.0)],
        "sampled": [c.token_ids for c in engine.generate(PROMPTS, NEW_TOKENS, temperature=0.9, seed=7)],
        # no seed: rank 0 chooses one for everybody; only agreement between ranks is checked
        "unseeded": [c.token_ids for c in engine.generate(PROMPTS, NEW_TOKENS, temperature=0.9)],
        "logits": engine.logits([PROMPTS[0]])[0].tolist(),
    }
    model = engine.model
    if len(model.mtp):
        out["greedy_mtp"] = [c.token_ids for c in engine.generate(PROMPTS, NEW_TOKENS, 0.0, mtp=MTP_DRAFTS)]
        with torch.inference_mode():  # the MTP module teacher-forced on the prompt: its own logits
            tokens = torch.tensor([PROMPTS[0]])
            pos = torch.arange(tokens.shape[1]).unsqueeze(0)
            hidden = model(tokens, pos)
            h = model.mtp_forward(0, hidden[:, :-1], tokens[:, 1:], pos[:, 1:])
            out["mtp_logits"] = model.mtp[0].logits(h)[0].tolist()
    # the paged latent cache with pages of 4 positions (rows span several pages of a shuffled pool)
    default = model.opts
    model.opts = dataclasses.replace(default, page_size=4)
    try:
        out["greedy_pages4"] = [c.token_ids for c in engine.generate(PROMPTS, NEW_TOKENS, temperature=0.0)]
        if len(model.mtp):
            mtp = engine.generate(PROMPTS, NEW_TOKENS, 0.0, mtp=MTP_DRAFTS)
            out["greedy_mtp_pages4"] = [c.token_ids for c in mtp]
    finally:
        model.opts = default
    return out


def _worker(out_dir: str, ckpts: list[str]) -> None:
    par = init_from_env("gloo")
    try:
        results = {c: run_cases(dsv3.load(c, dtype="float32", progress=False, parallel=par)) for c in ckpts}
        Path(out_dir, f"rank{par.rank}.json").write_text(json.dumps({"world": par.world_size, "results": results}))
    finally:
        par.close()


# ------------------------------------------------------------------ launching
def torchrun(n: int, args: list[str], no_python: bool = False, stdin: str | None = None, cwd=None):
    """Run ``torchrun --standalone --nproc-per-node n`` (a free port); stop it and its workers on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}"]
    cmd += ["--no-python"] if no_python else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("WORLD_SIZE", None)
    proc = subprocess.Popen(
        cmd + args,
        stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(stdin, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # torchrun's workers run in sessions of their own: SIGTERM to torchrun, which forwards it and
        # waits for them; killing its group would leave them running
        proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        raise AssertionError(f"torchrun with {n} processes hung for {TIMEOUT_S} s:\n{err[-3000:]}") from None
    return proc.returncode, out, err


def _bf16_checkpoint(root: Path) -> Path:
    from dsv3.tools.convert import convert_checkpoint
    from tests.helpers import add_tiny_tokenizer, make_checkpoint

    src = make_checkpoint(root / "tiny-f32", seed=1, mtp=True)
    out = convert_checkpoint(src, root / "tiny-bf16", "bf16", progress=False).out
    add_tiny_tokenizer(out)
    return out


def _fp8_checkpoint(root: Path) -> Path:
    from dsv3.tools.convert import convert_checkpoint
    from tests.helpers import make_checkpoint

    src = make_checkpoint(root / "wide-f32", seed=2, mtp=True, **WIDE_FP8)
    return convert_checkpoint(src, root / "wide-fp8", "fp8", progress=False).out


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("parallel")
    return {"bf16": _bf16_checkpoint(root), "fp8": _fp8_checkpoint(root)}


@pytest.fixture(scope="module")
def reference(ckpts) -> dict[str, dict]:
    """What one process computes (no process group at all)."""
    return {k: run_cases(dsv3.load(p, dtype="float32", progress=False)) for k, p in ckpts.items()}


def _launch_workers(n: int, ckpts: dict[str, Path], out_dir: Path) -> dict[str, list[dict]]:
    rc, _, err = torchrun(n, [__file__, str(out_dir), *(str(p) for p in ckpts.values())])
    assert rc == 0, err[-3000:]
    ranks = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(n)]
    assert [r["world"] for r in ranks] == [n] * n
    return {k: [r["results"][str(p)] for r in ranks] for k, p in ckpts.items()}


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("world", [2, 4])
def test_n_processes_give_the_tokens_of_one(world, ckpts, reference, tmp_path):
    runs = _launch_workers(world, ckpts, tmp_path)
    for kind, per_rank in runs.items():
        ref = reference[kind]
        assert ref["greedy_mtp"] == ref["greedy"], f"{kind}: MTP speculative greedy differs from plain greedy"
        for rank, got in enumerate(per_rank):
            where = f"{kind} checkpoint, rank {rank} of {world}"
            assert got["greedy"] == ref["greedy"], where
            assert got["greedy_mtp"] == ref["greedy"], f"{where}, --mtp {MTP_DRAFTS}"
            assert got["greedy_pages4"] == got["greedy_mtp_pages4"] == ref["greedy"], f"{where}, pages of 4"
            assert got["sampled"] == ref["sampled"], f"{where}, sampled with seed 7"
            assert got["unseeded"] == per_rank[0]["unseeded"], f"{where}: ranks sampled different tokens"
            for key in ("logits", "mtp_logits"):
                diff = (torch.tensor(got[key]) - torch.tensor(ref[key])).abs().max().item()
                assert diff < TOL, f"{where}: {key} differ by {diff:.3g}"


def test_cli_under_torchrun_prints_once_and_matches_one_process(ckpts, monkeypatch, capsys):
    """``torchrun --no-python dsv3 run --interactive``: rank 0 reads the terminal and broadcasts each line."""
    args = ["run", "--ckpt-path", str(ckpts["bf16"]), "--interactive", "--raw", "--temperature", "0"]
    args += ["--max-new-tokens", "5", "--dtype", "float32", "--mtp", "2"]
    lines = "the cat sat on the mat\nhello world\n/exit\n"
    rc, out, err = torchrun(2, [str(Path(sys.executable).with_name("dsv3")), *args], no_python=True, stdin=lines)
    assert rc == 0, err[-3000:]

    from dsv3.cli import main

    monkeypatch.setattr("sys.stdin", io.StringIO(lines))
    assert main(args) == 0
    single = capsys.readouterr().out
    completions = [line for line in single.split(">>> ") if line.strip()]
    assert len(completions) == 2  # one line of output per prompt, printed once
    assert out == single


def test_rank_reads_and_holds_only_its_part(ckpts, monkeypatch):
    """Loading needs no process group: rank r of a (fake) world holds exactly its slice of every tensor
    and reads less than the whole checkpoint (no other rank's experts, no whole split tensor)."""
    from dsv3.runtime.checkpoint import CheckpointFiles

    read: list[tuple[str, int]] = []
    get, get_slice = CheckpointFiles.get, CheckpointFiles.get_slice

    def spy_get(self, name):
        t = get(self, name)
        read.append((name, t.numel() * t.element_size()))
        return t

    def spy_slice(self, name, *rng):
        t = get_slice(self, name, *rng)
        read.append((name, t.numel() * t.element_size()))
        return t

    monkeypatch.setattr(CheckpointFiles, "get", spy_get)
    monkeypatch.setattr(CheckpointFiles, "get_slice", spy_slice)
    for kind, path in ckpts.items():
        read.clear()
        full = dsv3.load(path, dtype="float32", progress=False).model.state_dict()
        whole = sum(n for _, n in read)
        for world, rank in ((2, 1), (4, 2)):
            read.clear()
            model = dsv3.load(path, dtype="float32", progress=False, parallel=ParallelContext(rank, world)).model
            for name, t in model.state_dict().items():
                ref = full[name]
                split = [d for d in range(t.dim()) if t.shape[d] != ref.shape[d]]
                assert len(split) <= 1, f"{kind} {name}: {list(t.shape)} vs {list(ref.shape)}"
                if split:
                    d = split[0]
                    assert ref.shape[d] == t.shape[d] * world, f"{kind} {name}"
                    ref = ref.narrow(d, rank * t.shape[d], t.shape[d])
                assert torch.equal(t.float(), ref.float()), f"{kind} {name} (rank {rank} of {world})"
            experts = model.layers[-1].ffn.w1.weight.shape[0]
            assert experts == 8 // world and model.layers[-1].ffn.expert_offset == rank * experts
            assert model.layers[0].attn.n_heads == model.cfg.num_attention_heads // world
            others = [
                n
                for n, _ in read
                if ".experts." in n
                and not rank * experts <= int(n.split(".experts.")[1].split(".")[0]) < (rank + 1) * experts
            ]
            assert not others, f"{kind}: rank {rank} read another rank's experts: {others[:3]}"
            assert sum(n for _, n in read) < 0.7 * whole, f"{kind}: rank {rank} of {world} read too much"


def test_impossible_layout_fails_before_reading_weights(ckpts, monkeypatch):
    from dsv3.errors import Dsv3Error
    from dsv3.runtime.checkpoint import CheckpointFiles

    def refuse(*_a, **_k):
        raise AssertionError("a weight was read before the layout was checked")

    monkeypatch.setattr(CheckpointFiles, "get", refuse)
    monkeypatch.setattr(CheckpointFiles, "get_slice", refuse)
    with pytest.raises(Dsv3Error, match=r"num_attention_heads \(4\) is not divisible by the world size 3"):
        dsv3.load(ckpts["bf16"], parallel=ParallelContext(0, 3))
    # 8 heads over 8 ranks: 1 head x (64 + 64) = 128 query rows is fine, but 1 x 64 o_proj columns is not
    with pytest.raises(Dsv3Error, match=r"o_proj\.weight: FP8 block-scaled weight cannot be split over 8 ranks"):
        dsv3.load(ckpts["fp8"], parallel=ParallelContext(0, 8))


if __name__ == "__main__":  # under torchrun: one rank of the worker
    _worker(sys.argv[1], sys.argv[2:])
