"""dsv3.model.parallel without a model: layouts, shard ranges, launching errors, and the collectives over gloo."""

from __future__ import annotations

import dataclasses
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from dsv3.errors import Dsv3Error
from dsv3.model.config import ModelConfig, builtin_config, load_config
from dsv3.model.parallel import (
    ParallelContext,
    check_layout,
    local_range,
    shard_dim,
    split_linears,
    vocab_parallel_embedding,
)
from dsv3.runtime.distributed import check_dist_backend, init_from_env
from dsv3.weights import FP8_BLOCK, HP


def released_fp8(path: str) -> str:
    """fmt_of of the released FP8 checkpoint: every attention/MLP projection is fp8, heads and eh_proj are not."""
    return HP if path.endswith(("head", "eh_proj")) else FP8_BLOCK


def v3() -> ModelConfig:
    return load_config(builtin_config("deepseek-v3-671b"))


# ------------------------------------------------------------------ single process
def test_world_of_one_is_a_no_op():
    par = ParallelContext()
    x = torch.randn(2, 3)
    assert par.all_reduce_(x) is x
    assert par.all_gather_last(x) is x
    assert par.broadcast_object({"a": [1, 2]}) == {"a": [1, 2]}
    assert par.on_rank0(lambda: 5) == 5
    assert par.local(12) == (0, 12)
    w = torch.randn(10, 4)
    ids = torch.tensor([[1, 9]])
    assert torch.equal(vocab_parallel_embedding(torch.nn.functional.embedding, ids, w, None), w[ids])


def test_local_ranges():
    assert ParallelContext(2, 4).local(16) == (8, 12)
    assert ParallelContext(0, 2).local(96) == (0, 48)


def test_shard_dim_table():
    column = ["embed", "mtp.0.embed", "head.weight", "mtp.0.head.weight", "layers.0.attn.wq_b.weight"]
    column += ["layers.0.attn.wq.weight", "layers.2.attn.wkv_b.scale", "layers.0.ffn.w1.weight"]
    column += ["layers.5.ffn.shared.w3.scale", "mtp.0.block.attn.wq_b.weight"]
    row = ["layers.0.attn.wo.weight", "layers.1.ffn.w2.scale", "layers.4.ffn.shared.w2.weight"]
    row += ["mtp.0.block.attn.wo.weight"]
    replicated = ["layers.0.attn.wq_a.weight", "layers.0.attn.wkv_a.weight", "layers.0.attn.q_norm.weight"]
    replicated += ["layers.0.attn.kv_norm.weight", "layers.3.ffn.gate_weight", "layers.3.ffn.gate_bias"]
    replicated += ["norm.weight", "mtp.0.eh_proj.weight", "mtp.0.enorm.weight", "layers.0.attn_norm.weight"]
    assert {n: shard_dim(n) for n in column} == dict.fromkeys(column, 0)
    assert {n: shard_dim(n) for n in row} == dict.fromkeys(row, 1)
    assert {n: shard_dim(n) for n in replicated} == dict.fromkeys(replicated, None)


def test_local_range_of_weights_and_scales():
    par = ParallelContext(1, 2)
    assert local_range("layers.0.attn.wq_b.weight", "q", (512, 64), par) == (0, 256, 512)
    assert local_range("layers.0.attn.wo.weight", "o", (64, 512), par) == (1, 256, 512)
    # fp8 block scales follow their weight on 128 boundaries
    assert local_range("layers.0.attn.wq_b.scale", "s", (4, 1), par, weight_size=512) == (0, 2, 4)
    assert local_range("layers.0.attn.wo.scale", "s", (1, 4), par, weight_size=512) == (1, 2, 4)
    # int8 per-channel scales: cut with the rows, whole for a column split
    assert local_range("layers.0.attn.wq_b.scale", "s", (512,), par) == (0, 256, 512)
    assert local_range("layers.0.attn.wo.scale", "s", (64,), par) is None
    assert local_range("layers.0.attn.wq_a.weight", "a", (16, 64), par) is None
    assert local_range("layers.0.attn.wq_b.weight", "q", (512, 64), ParallelContext()) is None
    with pytest.raises(Dsv3Error, match=r"^model\.x\.q_b_proj\.weight_scale_inv: FP8 block scales cannot be split"):
        local_range("layers.0.attn.wq_b.scale", "model.x.q_b_proj.weight_scale_inv", (3, 1), par, weight_size=384)
    with pytest.raises(Dsv3Error, match=r"dimension 0 \(5\) is not divisible by the world size 2"):
        local_range("layers.0.attn.wq_b.weight", "q", (5, 4), par)


# ------------------------------------------------------------------ layouts
@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("num_attention_heads", 6, r"num_attention_heads \(6\) is not divisible by the world size 4"),
        ("n_routed_experts", 6, r"n_routed_experts \(6\) is not divisible by the world size 4"),
        ("vocab_size", 98, r"vocab_size \(98\) is not divisible by the world size 4"),
        ("intermediate_size", 50, r"intermediate_size \(50\) is not divisible by the world size 4"),
        ("moe_intermediate_size", 6, r"n_shared_experts \* moe_intermediate_size \(6\) is not divisible"),
    ],
)
def test_impossible_layouts_are_named(field, value, message):
    cfg = ModelConfig(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        n_routed_experts=8,
        num_experts_per_tok=2,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        q_lora_rank=16,
        kv_lora_rank=16,
        source="tiny.json",
    )
    check_layout(cfg, 4)  # as it is, it splits over 4
    with pytest.raises(Dsv3Error, match=f"^tiny.json: {message}"):
        check_layout(dataclasses.replace(cfg, **{field: value}), 4)


def test_released_671b_fp8_splits_on_block_boundaries_at_8_and_16_ranks():
    cfg = v3()
    for world in (1, 2, 4, 8, 16):
        check_layout(cfg, world, released_fp8)
        for path, _dim, size in split_linears(cfg, world):
            assert size % 128 == 0, (world, path, size)
    # at 32 ranks the dense MLPs (18432 / 32 = 576) and shared experts (2048 / 32 = 64) fall inside blocks
    with pytest.raises(Dsv3Error, match=r"^model\.layers\.0\.mlp\.gate_proj\.weight: .* 576 output rows per rank"):
        check_layout(cfg, 32, released_fp8)
    check_layout(cfg, 32, lambda _path: HP)  # a BF16 checkpoint splits anywhere the counts divide
    with pytest.raises(Dsv3Error, match=r"num_attention_heads \(128\) is not divisible by the world size 3"):
        check_layout(cfg, 3)


# ------------------------------------------------------------------ launching
def test_init_from_env_without_torchrun_is_one_process():
    par = init_from_env("gloo", env={})
    assert (par.rank, par.world_size, par.distributed) == (0, 1, False)
    assert init_from_env("no-such-library", env={"WORLD_SIZE": "1"}).world_size == 1


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"WORLD_SIZE": "2", "RANK": "0"}, r"'no-such-ccl' .* is not available"),
        ({"WORLD_SIZE": "two"}, r"WORLD_SIZE='two' is not an integer"),
        ({"WORLD_SIZE": "2"}, r"RANK is not set: launch several processes with torchrun"),
        ({"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2 is outside"),
    ],
)
def test_init_from_env_errors_before_any_work(env, message):
    with pytest.raises(Dsv3Error, match=message):
        init_from_env("no-such-ccl", env=env)
    assert not dist.is_initialized()


def test_missing_master_address_is_named():
    with pytest.raises(Dsv3Error, match="MASTER_ADDR is not set"):
        init_from_env("gloo", env={"WORLD_SIZE": "2", "RANK": "1"})


@pytest.mark.skipif(dist.is_nccl_available(), reason="this PyTorch build has NCCL")
def test_missing_nccl_is_a_clear_error():
    with pytest.raises(Dsv3Error, match=r"communication library 'nccl'"):
        check_dist_backend("nccl")


# ------------------------------------------------------------------ collectives over gloo (2 processes)
def _collectives(rank: int, world: int, port: int, errors) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    par = init_from_env("gloo", env={"WORLD_SIZE": str(world), "RANK": str(rank), **os.environ})
    try:
        x = torch.full((2, 3), float(rank + 1))
        assert torch.equal(par.all_reduce_(x), torch.full((2, 3), 3.0))
        y = torch.arange(4, dtype=torch.bfloat16).view(2, 2).t() + rank  # non-contiguous, bf16
        assert torch.equal(par.all_reduce_(y), (torch.arange(4, dtype=torch.bfloat16).view(2, 2).t() * 2 + 1))
        g = par.all_gather_last(torch.full((2, 1, 2), float(rank)))
        assert torch.equal(g, torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(2, 1, 4))
        assert par.broadcast_object({"line": "héllo", "n": [rank]}) == {"line": "héllo", "n": [0]}
        assert par.on_rank0(lambda: f"from {rank}") == "from 0"
        try:
            par.on_rank0(lambda: (_ for _ in ()).throw(Dsv3Error("prompts.txt: input file not found")))
            raise AssertionError("the error on rank 0 was not raised here")
        except Dsv3Error as exc:
            assert str(exc) == "prompts.txt: input file not found"
        table = torch.randn(8, 3, generator=torch.Generator().manual_seed(0))
        ids = torch.tensor([[0, 3, 4, 7], [5, 5, 1, 2]])
        local = table[par.local(8)[0] : par.local(8)[1]]
        got = vocab_parallel_embedding(torch.nn.functional.embedding, ids, local, par)
        assert torch.equal(got, table[ids])
    except BaseException as exc:  # reported to the parent process, then re-raised
        errors.put(f"rank {rank}: {exc!r}")
        raise
    finally:
        par.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_collectives_over_gloo():
    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_collectives, args=(r, 2, port, errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "a rank hung in a collective"
    messages = []
    while not errors.empty():
        messages.append(errors.get())
    assert not messages, messages
    assert [p.exitcode for p in procs] == [0, 0]
