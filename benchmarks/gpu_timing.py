"""CUDA timing shared by the GPU benchmarks (kernels.py, decode_step.py, quant.py).

Every helper warms up first (compiles, handles, allocator) and returns a median.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch


def event_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median device time of ``fn`` in ms: CUDA events around each call, launched back to back so the
    device is not left idle between calls by the host."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    pairs = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        pairs.append((start, end))
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in pairs)


def wall_ms(fn: Callable[[], object], iters: int, warmup: int = 3) -> float:
    """Median host wall time of ``fn`` in ms, synchronised after each call: what a caller waits,
    launch overhead included."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def graph_us(calls: Sequence[Callable[[], object]], replays: int = 20) -> float:
    """Median time per call in us of ``calls`` captured back to back in one CUDA graph.

    The graph removes launch gaps (serving replays decode graphs too); passing calls over several
    copies of the weights keeps them out of L2, which holds a small layer whole.
    """
    for fn in calls:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    return 1000 * event_ms(graph.replay, replays, warmup=1) / len(calls)


def copy_gbps(iters: int = 20) -> float:
    """Device-to-device copy of 1 GiB: bytes read plus bytes written per second, in GB/s."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() / event_ms(lambda: dst.copy_(src), iters) / 1e6
