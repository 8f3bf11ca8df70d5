"""Pick the number of torch CPU threads that is fastest right now, and keep re-checking.

On a host shared with other work, every parallel region of a multi-threaded GEMM waits for its
slowest thread, and a thread whose core is busy waits for a scheduler time slice: measured on 2 cores
with a busy neighbour, a batch-16 decode step took 7x longer on 2 threads than on 1, while on an idle
host 2 threads are the faster choice. Neither setting is right all the time, so every
``interval_s`` the tuner times a short probe of model-shaped GEMMs (the same many-small-regions
pattern a decode step has) at each candidate thread count and keeps the fastest. A probe costs a few
milliseconds; at the default interval that is well under 1% of the engine's time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from leanserve.model.layers import cpu_packing_available, pack_cpu_weight, packed_linear

logger = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass
class ThreadTuner:
    max_threads: int
    hidden_size: int
    intermediate_size: int
    # With workers that spin between regions (leanserve/__init__.py), 2 threads beside a busy neighbour
    # are much slower than 1, so a neighbour that arrives costs until the next probe: every 2 s, at
    # 5.4 ms a probe for the embedded model (median of 20 on the idle 2-core host: 0.27% of the time).
    interval_s: float = 2.0
    probe_rows: int = 16
    probe_repeats: int = 12
    # Fewer threads must beat more by this factor to be chosen. On an idle host all threads are
    # clearly faster (2 vs 1: 1.5x decode, 2.2x prefill), yet a probe squeezed between the server's
    # own HTTP work can read them as a tie; the contention this guards against costs 4-7x.
    margin: float = 1.25
    current: int = 0
    last_tuned: float | None = None  # None: the clock starts at the first call
    _up_votes: int = 0  # probes in a row that favoured more threads than now
    history: list[tuple[float, dict[int, float], int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.candidates = sorted({self.max_threads, max(1, self.max_threads // 2), 1})
        self.current = self.max_threads
        self._x = torch.randn(self.probe_rows, self.hidden_size)
        weight = torch.randn(self.intermediate_size, self.hidden_size)
        # Probe the matmul the model really runs: packed oneDNN weights scale with threads quite
        # differently from plain ones.
        if cpu_packing_available():
            packed = pack_cpu_weight(weight)
            self._matmul = lambda: packed_linear(self._x, packed, None)
        else:
            self._matmul = lambda: torch.nn.functional.linear(self._x, weight)

    def _probe(self, threads: int) -> float:
        torch.set_num_threads(threads)
        self._matmul()  # untimed: a thread count's first region pays for waking its threads
        # The slower of two: a probe lasts ~1 ms, shorter than a scheduler time slice, so beside a busy
        # neighbour one of two often runs unpreempted and reads 2 threads as fast (1.1 vs 7.4 ms).
        worst = 0.0
        for _ in range(2):
            start = time.perf_counter()
            for _ in range(self.probe_repeats):
                self._matmul()
            worst = max(worst, time.perf_counter() - start)
        return worst

    def maybe_retune(self, now: float | None = None) -> int:
        """Re-probe if the interval has passed; returns the thread count in force."""
        now = time.monotonic() if now is None else now
        if self.last_tuned is None:
            # The first probe waits one interval: at start-up the server's own work (the garbage
            # collector's freeze, the first requests' tokenising) and the new thread's first parallel
            # regions made 2 threads probe 5x slower than they run, and a short run then stayed on 1.
            self.last_tuned = now
            torch.set_num_threads(self.current)
            return self.current
        if now - self.last_tuned < self.interval_s or len(self.candidates) == 1:
            return self.current
        self.last_tuned = now
        times = {n: self._probe(n) for n in self.candidates}
        choice = self.candidates[-1]
        for n in reversed(self.candidates[:-1]):
            if times[n] * self.margin < times[choice]:
                choice = n
        # Down at once, up only on a second probe in a row: beside a busy neighbour a probe of more
        # threads still reads fast now and then (an unpreempted millisecond), and each such flip cost
        # a whole interval of slow steps.
        self._up_votes = self._up_votes + 1 if choice > self.current else 0
        if choice > self.current and self._up_votes < 2:
            choice = self.current
        if choice != self.current:
            logger.info(
                "CPU threads %d -> %d (probe: %s)",
                self.current, choice, ", ".join(f"{n} threads {t * 1e3:.1f} ms" for n, t in times.items()),
            )
        self.current = choice
        torch.set_num_threads(choice)
        self.history.append((now, times, choice))
        del self.history[:-100]
        return choice


def run_on_own_thread(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on a new thread that ends when it returns, for work that runs torch ops (loading
    the model) before the engine's step loop takes over on its own thread.

    libgomp keeps a pool of worker threads for every thread that ever started a parallel region, and
    counts them all. Once there are more than cores (the loader's pool beside the step loop's), it
    stops spinning between regions, and a decode step is a few hundred back-to-back regions: on the
    2-core host, a batch-1 INT4 step took 16.9 ms instead of 8.9. A thread that ends frees its pool.
    """
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as exc:  # handed to the caller below
            result["error"] = exc

    thread = threading.Thread(target=target, name="leanserve-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]
    return result["value"]
