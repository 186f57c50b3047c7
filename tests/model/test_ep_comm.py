"""Expert-parallel dispatch/combine (dsv3.model.ep_comm) and its check on 2 and 4 gloo ranks.

The test launches torchrun on this file: under torchrun it is the worker, which runs the check on the
reference pair and on two planted errors (wrong destination rank; combine ignoring top-k weights) and
writes what each raised to rankN.json.
"""

from __future__ import annotations

import json
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch


def _worker(out_dir: str) -> None:
    import torch.distributed as dist

    from dsv3.errors import Dsv3Error
    from dsv3.model import ep_comm

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    epr = 3

    def wrong_rank(x, ids, w, experts_per_rank, group):
        # same local expert, next rank: each row lands on the wrong rank's copy of that expert
        return ep_comm.moe_dispatch(
            x, (ids + experts_per_rank) % (world * experts_per_rank), w, experts_per_rank, group
        )

    def no_weights(y, handle):
        return ep_comm.moe_combine(y, replace(handle, weights=torch.ones_like(handle.weights)))

    cases = {"reference": {}, "wrong_rank": {"dispatch": wrong_rank}, "no_weights": {"combine": no_weights}}
    results = {}
    for name, fns in cases.items():
        try:
            ep_comm.check_moe_comm(**fns, experts_per_rank=epr, seed=1)
            results[name] = None
        except Dsv3Error as e:
            results[name] = str(e)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 4])
def test_check_passes_reference_and_catches_planted_errors(world, tmp_path):
    from tests.runtime.test_parallel import torchrun  # not at top: the torchrun worker has no tests package

    rc, _, err = torchrun(world, [__file__, str(tmp_path)])
    assert rc == 0, err[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world)]
    for r, res in enumerate(ranks):
        assert res["reference"] is None, f"rank {r}: {res['reference']}"
        if r != 1:  # rank 1 has no tokens (the idle-rank case); every other rank must see both errors
            assert "differs" in (res["wrong_rank"] or ""), f"rank {r} missed the wrong destination"
            assert "differs" in (res["no_weights"] or ""), f"rank {r} missed the dropped weights"


if __name__ == "__main__":  # under torchrun: one rank of the worker
    _worker(sys.argv[1])


def test_resolve_takes_the_backends_pair_or_the_reference_never_half():
    import pluggy

    from dsv3 import hookspecs
    from dsv3.errors import Dsv3Error
    from dsv3.model import ep_comm

    def mine_d(*a):
        return None

    def mine_c(*a):
        return None

    class Both:
        @hookspecs.hookimpl
        def dsv3_comm_moe_dispatch(self):
            return mine_d

        @hookspecs.hookimpl
        def dsv3_comm_moe_combine(self):
            return mine_c

    class Half:
        @hookspecs.hookimpl
        def dsv3_comm_moe_dispatch(self):
            return mine_d

    def pm(*plugins):
        m = pluggy.PluginManager(hookspecs.PROJECT)
        m.add_hookspecs(hookspecs.BackendSpec)
        for p in plugins:
            m.register(p)
        return m

    assert ep_comm.resolve_moe_comm(pm().hook) == (ep_comm.moe_dispatch, ep_comm.moe_combine)
    assert ep_comm.resolve_moe_comm(pm(Both()).hook) == (mine_d, mine_c)
    with pytest.raises(Dsv3Error, match="supply both or neither"):
        ep_comm.resolve_moe_comm(pm(Half()).hook)
