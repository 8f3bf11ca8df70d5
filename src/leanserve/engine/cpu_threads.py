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
import time
from dataclasses import dataclass, field

import torch

from leanserve.model.layers import cpu_packing_available, pack_cpu_weight, packed_linear

logger = logging.getLogger(__name__)


@dataclass
class ThreadTuner:
    max_threads: int
    hidden_size: int
    intermediate_size: int
    interval_s: float = 5.0
    probe_rows: int = 16
    probe_repeats: int = 12
    # Fewer threads must beat more by this factor to be chosen. On an idle host all threads are
    # clearly faster (2 vs 1: 1.5x decode, 2.2x prefill), yet a probe squeezed between the server's
    # own HTTP work can read them as a tie; the contention this guards against costs 4-7x.
    margin: float = 1.25
    current: int = 0
    last_tuned: float = field(default=-1e9)
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
        best = float("inf")
        for _ in range(2):  # best of two: one unlucky time slice should not decide
            start = time.perf_counter()
            for _ in range(self.probe_repeats):
                self._matmul()
            best = min(best, time.perf_counter() - start)
        return best

    def maybe_retune(self, now: float | None = None) -> int:
        """Re-probe if the interval has passed; returns the thread count in force."""
        now = time.monotonic() if now is None else now
        if now - self.last_tuned < self.interval_s or len(self.candidates) == 1:
            return self.current
        self.last_tuned = now
        times = {n: self._probe(n) for n in self.candidates}
        choice = self.candidates[-1]
        for n in reversed(self.candidates[:-1]):
            if times[n] * self.margin < times[choice]:
                choice = n
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
