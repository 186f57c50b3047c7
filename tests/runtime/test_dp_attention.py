"""``--dp-attention`` (data-parallel attention + all-to-all expert parallelism) on CPU with gloo: 2 and
4 processes give exactly the greedy tokens of 1.

As in test_parallel.py, pytest launches torchrun on this file (``_worker``) and computes the
1-process reference itself. Each rank completes only its share of the prompts (3 prompts: 2 + 1 on
2 ranks, 1 + 1 + 1 + 0 on 4 ranks; one prompt: the other ranks have none) over a cache of its own
rows, and the MoE layers dispatch tokens to the ranks holding their experts. Compute is float32, and
the combine adds each token's experts in the order the single-process op does; an expert's matrix
products see other batches of rows than in one process (other prompts' padding, duplicated rows when
every rank runs the same prompt), which may change the last bits of a row: greedy tokens are compared
exactly, logits to TOL.

Uneven work: besides the uneven prompt shares, the "stop" case ends one prompt early with a stop
token chosen from the reference (its rank then idles while the others decode), and the speculative
(``mtp``) runs accept different numbers of drafts per rank. Each rank reports how many MoE rounds it
served with no tokens of its own, so the test knows the idle path ran.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

import dsv3
from dsv3.runtime.distributed import init_from_env

PROMPTS = [[0, 5, 9, 12, 40, 41, 7], [0, 33, 2, 17], [0, 8, 8, 3, 60, 21, 22, 23, 11]]
NEW_TOKENS = 8
MTP_DRAFTS = 2
TOL = 1e-4  # as test_parallel's: fp32 sums of ~100 terms of size ~1, added in another order


def run_cases(engine, stop: dict[str, int]) -> dict:
    """What every run computes (stop: checkpoint kind -> the stop token of the "stop" case)."""
    greedy = dict(max_new_tokens=NEW_TOKENS, temperature=0.0)
    out = {
        "greedy": [c.token_ids for c in engine.generate(PROMPTS, **greedy)],
        "one": [c.token_ids for c in engine.generate(PROMPTS[:1], **greedy)],
        "greedy_mtp": [c.token_ids for c in engine.generate(PROMPTS, **greedy, mtp=MTP_DRAFTS)],
        "logits": engine.logits([PROMPTS[0]])[0].tolist(),
    }
    if stop:
        kind = str(engine.path)
        cut = engine.generate(PROMPTS, **greedy, stop_token_ids=[stop[kind]])
        out["stop"] = [[c.token_ids, c.finish_reason] for c in cut]
        mtp = engine.generate(PROMPTS, **greedy, mtp=MTP_DRAFTS, stop_token_ids=[stop[kind]])
        out["stop_mtp"] = [c.token_ids for c in mtp]
    return out


def _worker(out_dir: str, stop_file: str, ckpts: list[str]) -> None:
    par = dataclasses.replace(init_from_env("gloo"), dp_attention=True)
    stop = json.loads(Path(stop_file).read_text())
    try:
        results = {}
        for c in ckpts:
            engine = dsv3.load(c, dtype="float32", progress=False, parallel=par)
            model = engine.model
            rows: list[int] = []
            new_cache = model.new_cache

            def spy(max_batch, *a, _new=new_cache, _rows=rows, **k):
                _rows.append(max_batch)
                return _new(max_batch, *a, **k)

            model.new_cache = spy
            out = run_cases(engine, stop)
            moe = model.layers[-1].ffn
            out["layout"] = {
                "heads": model.layers[0].attn.n_heads,
                "embed_rows": model.embed.shape[0],
                "experts": moe.w1.weight.shape[0],
                "expert_offset": moe.expert_offset,
                "shared_inter": moe.shared.w1.weight.shape[0],
            }
            out["cache_rows"] = rows
            out["empty_rounds"] = model.ep.empty_rounds
            results[c] = out
        Path(out_dir, f"rank{par.rank}.json").write_text(json.dumps({"world": par.world_size, "results": results}))
    finally:
        par.close()


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    from tests.runtime.test_parallel import _bf16_checkpoint, _fp8_checkpoint  # not under torchrun (no tests pkg)

    root = tmp_path_factory.mktemp("dp")
    return {"bf16": _bf16_checkpoint(root), "fp8": _fp8_checkpoint(root)}


@pytest.fixture(scope="module")
def reference(ckpts) -> tuple[dict[str, dict], dict[str, int]]:
    """What one process computes, and per checkpoint a stop token that ends prompt 0 early (one of its
    greedy tokens 2 to 4 that no other prompt's greedy output holds, so only prompt 0 changes)."""
    refs, stop = {}, {}
    for kind, path in ckpts.items():
        engine = dsv3.load(path, dtype="float32", progress=False)
        ref = run_cases(engine, {})
        g = ref["greedy"]
        tok = next((t for t in g[0][1:4] if t not in g[1] and t not in g[2]), None)
        assert tok is not None, f"{kind}: no token to stop prompt 0 alone early; change the prompts"
        stop[str(path)] = tok
        ref.update(run_cases(engine, {str(path): tok}))
        refs[kind] = ref
    return refs, stop


def _share(n: int, rank: int, world: int) -> int:
    return n // world + (rank < n % world)


@pytest.mark.e2e
@pytest.mark.parametrize("world", [2, 4])
def test_dp_attention_gives_the_tokens_of_one_process(world, ckpts, reference, tmp_path):
    from tests.runtime.test_parallel import torchrun

    refs, stop = reference
    stop_file = tmp_path / "stop.json"
    stop_file.write_text(json.dumps(stop))
    rc, _, err = torchrun(world, [__file__, str(tmp_path), str(stop_file), *(str(p) for p in ckpts.values())])
    assert rc == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    assert [r["world"] for r in ranks] == [world] * world
    for kind, path in ckpts.items():
        ref = refs[kind]
        assert ref["greedy_mtp"] == ref["greedy"] and ref["stop_mtp"] == [t for t, _ in ref["stop"]]
        assert ref["stop"][0][1] == "stop" and len(ref["stop"][0][0]) < NEW_TOKENS  # prompt 0 ends early
        cfg = dsv3.load(path, dtype="float32", progress=False).cfg
        for rank, r in enumerate(ranks):
            got = r["results"][str(path)]
            where = f"{kind} checkpoint, rank {rank} of {world}"
            for case in ("greedy", "one", "greedy_mtp", "stop", "stop_mtp"):
                assert got[case] == ref[case], f"{where}: {case}"
            diff = (torch.tensor(got["logits"]) - torch.tensor(ref["logits"])).abs().max().item()
            assert diff < TOL, f"{where}: full-sequence logits differ by {diff:.3g}"
            lay = got["layout"]
            # replicated attention, embeddings and shared experts; routed experts split
            assert lay["heads"] == cfg.num_attention_heads and lay["embed_rows"] == cfg.vocab_size, where
            assert lay["shared_inter"] == cfg.n_shared_experts * cfg.moe_intermediate_size, where
            e = cfg.n_routed_experts // world
            assert lay["experts"] == e and lay["expert_offset"] == rank * e, where
            # the cache holds this rank's rows only: 3 prompts (x4 runs), then 1 prompt, per generate call
            want = [_share(3, rank, world), _share(1, rank, world)] + [_share(3, rank, world)] * 3
            assert got["cache_rows"] == [n for n in want if n], where
        # some rank served MoE rounds with no tokens of its own (no prompts, or done before the others)
        assert all(r["results"][str(path)]["empty_rounds"] > 0 for r in ranks[1:]), kind


@pytest.mark.e2e
def test_cli_dp_attention_prints_what_one_process_prints(ckpts, capsys):
    """``torchrun --no-python dsv3 run --dp-attention`` with 3 prompts on 2 ranks: the JSON lines of one
    process (rank 0 prints every prompt's completion, in order, once)."""
    args = ["run", "--ckpt-path", str(ckpts["bf16"]), "--raw", "--temperature", "0", "--max-new-tokens", "5"]
    args += ["--dtype", "float32", "--output-format", "jsonl", "--mtp", "2"]
    for text in ("the cat sat", "hello world", "a big dog ran on the mat"):
        args += ["--prompt", text]
    from tests.runtime.test_parallel import torchrun

    rc, out, err = torchrun(2, [str(Path(sys.executable).with_name("dsv3")), *args, "--dp-attention"], no_python=True)
    assert rc == 0, err[-3000:]

    from dsv3.cli import main

    assert main(args) == 0
    single = capsys.readouterr().out

    def records(text: str) -> list[dict]:
        rows = [json.loads(line) for line in text.splitlines()]
        for r in rows:
            r["mtp"].pop("tokens_per_s")  # wall clock
        return rows

    assert len(single.splitlines()) == 3
    assert records(out) == records(single)


@pytest.mark.parametrize("n, world", [(3, 2), (1, 4), (10, 4), (0, 3), (8, 8)])
def test_prompts_are_shared_contiguously_and_as_evenly_as_possible(n, world):
    from dsv3.runtime.engine import share

    parts = [share(n, r, world) for r in range(world)]
    assert parts[0][0] == 0 and parts[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(parts, parts[1:], strict=False))  # contiguous, in rank order
    sizes = [hi - lo for lo, hi in parts]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_dp_attention_needs_several_processes(monkeypatch, capsys):
    from dsv3.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["run", "--prompt", "hi", "--dp-attention"]) == 2
    err = capsys.readouterr().err
    assert (
        err.strip()
        == "dsv3: error: --dp-attention needs several processes: launch dsv3 run under torchrun (WORLD_SIZE > 1)"
    )


if __name__ == "__main__":  # under torchrun: one rank of the worker
    _worker(sys.argv[1], sys.argv[2], sys.argv[3:])
