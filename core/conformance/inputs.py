"""Checking that an operator leaves its inputs as it found them.

A snapshot copies everything reachable from the arguments: plain tensors, the fields of dataclass
arguments (a :class:`~dsv3.weights.Weight`'s ``data`` and ``scale``, and its ``fmt`` and
``block_size``) and the items of tuples and lists. After the call the same paths are read again, so
a field rebound to another tensor (``w.data = torch.zeros_like(w.data)``) is caught as well as a
tensor written in place (``w.data.zero_()``). Tensors are compared bit for bit, dtype and shape
included, so NaN inputs need no special case and a float32 tensor swapped for an equal float64 one
still counts as a change.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterator

import torch

#: Leaves that are compared by value (immutable, cheap to keep).
_SCALARS = (bool, int, float, str, type(None))
_MISSING = object()
#: Integer dtype of each element size, to compare floating tensors by their bits.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}

Snapshot = dict[tuple[int, str], object]


def argument_names(fn: Callable, n: int) -> list[str]:
    """Names of ``fn``'s first ``n`` positional parameters (``arg{i}`` where they cannot be read)."""
    try:
        params = [
            p.name
            for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        params = []
    return [params[i] if i < len(params) else f"arg{i}" for i in range(n)]


def _leaves(value: object, path: str) -> Iterator[tuple[str, object]]:
    if isinstance(value, torch.Tensor):
        yield path, value
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _leaves(getattr(value, f.name), f"{path}.{f.name}")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _leaves(item, f"{path}[{i}]")
    elif isinstance(value, _SCALARS):
        yield path, value


def _walk(args: tuple, names: list[str]) -> Iterator[tuple[tuple[int, str], object]]:
    for i, (arg, name) in enumerate(zip(args, names, strict=True)):
        for path, leaf in _leaves(arg, name):
            yield (i, path), leaf


def snapshot(args: tuple, names: list[str], limit: int) -> Snapshot:
    """Copies of the arguments' leaves; tensors of more than ``limit`` elements are left unwatched."""
    saved: Snapshot = {}
    for key, leaf in _walk(args, names):
        if isinstance(leaf, torch.Tensor):
            if leaf.numel() > limit:
                continue
            leaf = leaf.clone()
        saved[key] = leaf
    return saved


def _same_bits(before: torch.Tensor, after: torch.Tensor) -> bool:
    if before.dtype != after.dtype or before.shape != after.shape or before.device != after.device:
        return False
    if before.is_floating_point() and before.element_size() in _BITS:
        bits = _BITS[before.element_size()]
        return torch.equal(before.view(bits), after.view(bits))
    return torch.equal(before, after)


def _same(before: object, after: object) -> bool:
    if isinstance(before, torch.Tensor):
        return isinstance(after, torch.Tensor) and _same_bits(before, after)
    return after is before or (type(after) is type(before) and after == before)


def first_change(args: tuple, names: list[str], saved: Snapshot) -> str | None:
    """``"argument 1 (w.data)"``: the first watched leaf that differs from its snapshot, or None."""
    now = dict(_walk(args, names))
    for (i, path), before in saved.items():
        if not _same(before, now.get((i, path), _MISSING)):
            return f"argument {i} ({path})"
    return None
