"""Starting a run on several processes: the process group from torchrun's environment, the backend's
communication device, one sampling seed for every rank, output from rank 0 only."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

from ..errors import Dsv3Error
from ..model.parallel import ParallelContext


# ---------------------------------------------------------------- launching
def check_dist_backend(name: str) -> None:
    """A Dsv3Error unless torch.distributed and its communication library ``name`` are usable here."""
    if not dist.is_available():
        raise Dsv3Error("this PyTorch build has no torch.distributed: running on several processes is impossible")
    if not dist.is_backend_available(name):
        raise Dsv3Error(
            f"communication library {name!r} (the backend's dist_backend) is not available in this PyTorch "
            f"build: torch.distributed.is_backend_available({name!r}) is False"
        )


def _env_int(env: Mapping[str, str], key: str, default: int | None) -> int:
    raw = env.get(key)
    if raw is None or raw == "":
        if default is None:
            raise Dsv3Error(f"{key} is not set: launch several processes with torchrun (see docs/parallel.md)")
        return default
    try:
        return int(raw)
    except ValueError:
        raise Dsv3Error(f"environment variable {key}={raw!r} is not an integer") from None


def init_from_env(dist_backend: str, device: str = "cpu", env: Mapping[str, str] | None = None) -> ParallelContext:
    """The parallel context torchrun describes in the environment (``WORLD_SIZE``, ``RANK``...).

    Without ``WORLD_SIZE`` (or with 1) this is the single-process context and nothing is initialised.
    Otherwise the communication library is checked first (a clear Dsv3Error if it is missing), a
    non-CPU ``device`` is bound to the accelerator ``LOCAL_RANK``, and the default process group is
    initialised (``env://``: ``MASTER_ADDR``/``MASTER_PORT``, which torchrun sets).
    """
    env = os.environ if env is None else env
    world = _env_int(env, "WORLD_SIZE", 1)
    if world <= 1:
        return ParallelContext(device=device)
    rank = _env_int(env, "RANK", None)
    local_rank = _env_int(env, "LOCAL_RANK", rank)
    if not 0 <= rank < world:
        raise Dsv3Error(f"RANK={rank} is outside 0..WORLD_SIZE-1 ({world - 1})")
    check_dist_backend(dist_backend)
    for key in ("MASTER_ADDR", "MASTER_PORT"):
        if not env.get(key) and not dist.is_initialized():
            raise Dsv3Error(f"WORLD_SIZE={world} but {key} is not set: launch with torchrun (see docs/parallel.md)")
    if str(device) != "cpu" and torch.accelerator.is_available():
        count = torch.accelerator.device_count()
        if local_rank >= count:
            raise Dsv3Error(f"LOCAL_RANK={local_rank} but only {count} devices are visible on this machine")
        torch.accelerator.set_device_index(local_rank)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group(dist_backend, rank=rank, world_size=world)
        owns = True
    return ParallelContext(rank, world, None, str(device), owns)


def agree_on_seed(par: ParallelContext | None, seed: int | None, temperature: float) -> int | None:
    """The sampling seed every rank uses: sampled tokens must be the same on all ranks (they feed the
    next step's embedding all-reduce), so without a seed rank 0 draws one and broadcasts it. Under
    ``dp_attention`` each rank samples its own requests: the seed is kept as given."""
    if seed is not None or par is None or par.world_size == 1 or temperature <= 0 or par.dp_attention:
        return seed
    return par.broadcast_object(random.SystemRandom().getrandbits(62) if par.rank == 0 else None)


def init_for_backend(backend: str, env: Mapping[str, str] | None = None) -> ParallelContext:
    """:func:`init_from_env` with the communication library and device that dsv3 backend ``backend``
    names in its BackendInfo (gloo for cpu_ref, nccl, hccl...)."""
    from .. import registry

    info = registry.get_backend(backend).info
    return init_from_env(info.dist_backend, info.device, env)


@contextlib.contextmanager
def quiet_unless_rank0(par: ParallelContext) -> Iterator[None]:
    """Only rank 0 prints: other ranks' stdout and stderr go to /dev/null inside this block (an
    exception leaving it is still reported by the caller, on every rank)."""
    if par.rank == 0:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        yield
