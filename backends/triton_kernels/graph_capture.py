"""``BackendInfo.capture_graph`` for nvidia and amd: ``torch.cuda.CUDAGraph`` (HIP graphs under ROCm).

Capture follows the usual recipe: warm the step up on a side stream (Triton compiles and autotunes its
kernels there, and the caching allocator settles), then record it into a graph whose memory comes from one
pool shared by every graph of the process (buckets are replayed one at a time, never concurrently).
Importing this module imports neither triton nor the kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

WARMUP_RUNS = 2
_pool = None


def capture_cuda_graph(step: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
    """Record ``step`` into a CUDA (HIP) graph; ``replay()`` returns ``step``'s output tensor, refilled."""
    global _pool
    if _pool is None:
        _pool = torch.cuda.graph_pool_handle()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(WARMUP_RUNS):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=_pool):
        out = step()

    def replay() -> torch.Tensor:
        graph.replay()
        return out

    return replay


def capture_graph() -> Callable[[Callable[[], torch.Tensor]], Callable[[], torch.Tensor]] | None:
    """What the plugins put in ``BackendInfo.capture_graph``: None under the interpreter (CPU tensors)."""
    from .ops import interpreting

    return None if interpreting() else capture_cuda_graph
