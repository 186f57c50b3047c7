"""A graph capture for any device: record a step's ATen calls once, replay them as a CUDA graph would.

This is ``BackendInfo.capture_graph``'s semantics without a GPU, so that the runtime's capture path
(static buffers, padding rows, buckets, fallbacks) is tested on a CPU and a backend author can check
that a step is capturable before trying it on hardware. It is not faster than the eager step.

- :func:`record_replay` runs ``step`` once under a dispatch mode that records every ATen call with its
  arguments. ``replay()`` calls the same operators again in the same order: tensors that the step did not
  make (static inputs, weights, caches) are the same objects, so their current contents are read and
  in-place writes land in them, as a graph reads and writes the same addresses; tensors the step made are
  replaced by the replay's. Python values (ints, shapes, branches taken) are those seen at capture.
- What a CUDA graph cannot capture raises :class:`CaptureError` at capture, naming the operator: a copy of
  device data to the host (``.item()``, ``int(t)``, ``bool(t)``) and operators whose output shape depends
  on the data (``nonzero``, ``unique``, ``bincount``, ``masked_select``, indexing with a boolean mask). ``.tolist()`` and
  ``.numpy()`` read CPU memory without an ATen call, so they go unseen here: a step using them replays
  the values seen at capture, which a test comparing replay with eager steps catches.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

aten = torch.ops.aten

#: Operators whose result a graph cannot hold: a host copy or a shape that depends on the data.
HOST_SYNC_OPS = frozenset(
    {
        aten._local_scalar_dense,
        aten.bincount,
        aten.nonzero,
        aten.nonzero_static,
        aten.unique_consecutive,
        aten._unique,
        aten._unique2,
        aten.unique_dim,
        aten.masked_select,
    }
)


class CaptureError(RuntimeError):
    """The step cannot be captured: it reads device data on the host or makes a data-dependent shape."""


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices)


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[Any, tuple, dict, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in HOST_SYNC_OPS or (
            packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_) and _bool_index(args)
        ):
            raise CaptureError(f"{func} reads data on the host or makes a data-dependent shape")
        if packet is aten.repeat_interleave and func._overloadname != "self_int" and kwargs.get("output_size") is None:
            raise CaptureError(f"{func} with tensor repeats and no output_size makes a data-dependent shape")
        out = func(*args, **kwargs)
        self.calls.append((func, args, kwargs, out))
        return out


def record_replay(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """``BackendInfo.capture_graph`` for any device (module docstring): run ``step`` once, recording it;
    ``replay()`` redoes the recorded calls and returns ``step``'s output tensor with the new contents."""
    recorder = _Recorder()
    with recorder:
        out = step()
    if not isinstance(out, torch.Tensor):
        raise CaptureError(f"a captured step returns one tensor, got {type(out).__name__}")
    calls = recorder.calls

    def replay() -> torch.Tensor:
        made: dict[int, torch.Tensor] = {}  # id of a tensor made at capture -> the one this replay made

        def swap(x):
            return made.get(id(x), x) if isinstance(x, torch.Tensor) else x

        for func, args, kwargs, result in calls:
            new = func(*tree_map(swap, args), **tree_map(swap, kwargs))
            flat_old, flat_new = _flat(result), _flat(new)
            for old_t, new_t in zip(flat_old, flat_new, strict=True):
                if isinstance(old_t, torch.Tensor) and id(old_t) not in made:
                    made[id(old_t)] = new_t
        final = made.get(id(out), out)
        if final is not out:
            out.copy_(final)
        return out

    return replay


def _flat(x) -> list:
    return list(x) if isinstance(x, (list, tuple)) else [x]
