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

logger = logging.getLogger(__name__)


@dataclass
class ThreadTuner:
    max_threads: int
    hidden_size: int
    intermediate_size: int
    interval_s: float = 5.0
    probe_rows: int = 16
    probe_repeats: int = 12
    # A larger thread count must beat a smaller one by this factor to be chosen: fewer threads are
    # less exposed to neighbours, so ties go to them.
    margin: float = 1.1
    current: int = 0
    last_tuned: float = field(default=-1e9)
    history: list[tuple[float, dict[int, float], int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.candidates = sorted({self.max_threads, max(1, self.max_threads // 2), 1})
        self.current = self.max_threads
        self._x = torch.randn(self.probe_rows, self.hidden_size)
        self._w = torch.randn(self.intermediate_size, self.hidden_size)

    def _probe(self, threads: int) -> float:
        torch.set_num_threads(threads)
        best = float("inf")
        for _ in range(2):  # best of two: one unlucky time slice should not decide
            start = time.perf_counter()
            for _ in range(self.probe_repeats):
                torch.nn.functional.linear(self._x, self._w)
            best = min(best, time.perf_counter() - start)
        return best

    def maybe_retune(self, now: float | None = None) -> int:
        """Re-probe if the interval has passed; returns the thread count in force."""
        now = time.monotonic() if now is None else now
        if now - self.last_tuned < self.interval_s or len(self.candidates) == 1:
            return self.current
        self.last_tuned = now
        times = {n: self._probe(n) for n in self.candidates}
        choice = self.candidates[0]
        for n in self.candidates[1:]:
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
