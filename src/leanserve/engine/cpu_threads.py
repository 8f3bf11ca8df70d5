"""Pick the number of torch CPU threads that is fastest right now, and keep re-checking.

On a host shared with other work, every parallel region of a multi-threaded GEMM waits for its
slowest thread, and a thread whose core is busy waits for a scheduler time slice: measured on 2 cores
with a busy neighbour, a batch-16 decode step took 7x longer on 2 threads than on 1, while on an idle
host 2 threads are the faster choice. Neither setting is right all the time, so every
``interval_s`` the tuner times a short probe of model-shaped GEMMs (the same many-small-regions
pattern a decode step has) at each candidate thread count and keeps the fastest. A probe costs a few
milliseconds; at the default interval that is well under 1% of the engine's time.

Between probes, ``OtherCpuLoad`` watches how much CPU other processes take on this process's cores
(``/proc/stat`` less our own ``os.times()``), four times a second. When a neighbour arrives or leaves,
the tuner probes at once instead of running up to an interval on the wrong thread count. While one is
there, thread counts that would share its cores are not probed at all. On the 2-core host beside a
busy-looping process (``benchmarks/neighbour.py``), that took the served throughput from 170-178 to
202 tok/s; one pinned thread gets 190.
"""

from __future__ import annotations

import logging
import math
import os
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
class OtherCpuLoad:
    """Cores' worth of CPU time that other processes spent on ``cpus`` between two readings."""

    cpus: frozenset[int]
    _last: tuple[float, float, float] | None = None  # (clock, busy seconds on cpus, our CPU seconds)

    @classmethod
    def create(cls) -> OtherCpuLoad | None:
        """Watching this process's CPUs, or None where /proc/stat cannot be read (not Linux)."""
        load = cls(frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset())
        return load if load.cpus and _busy_seconds(load.cpus) is not None else None

    def read(self, now: float) -> float | None:
        """Other processes' CPU use since the last good reading, in cores; None on the first call or
        when /proc/stat could not be read (the next reading then spans the gap)."""
        busy = _busy_seconds(self.cpus)
        if busy is None:
            return None
        times = os.times()
        ours = times.user + times.system
        last, self._last = self._last, (now, busy, ours)
        if last is None or now <= last[0]:
            return None
        return max(0.0, (busy - last[1]) - (ours - last[2])) / (now - last[0])


def _busy_seconds(cpus: frozenset[int]) -> float | None:
    """Non-idle time of ``cpus`` since boot, from /proc/stat: user, nice, system, irq, softirq, steal."""
    ticks = 0
    try:
        with open("/proc/stat") as f:
            for line in f:  # the cpu lines come first; the rest (interrupt counts: long) is not read
                name, _, rest = line.partition(" ")
                if not name.startswith("cpu"):
                    break
                if name[3:].isdigit() and int(name[3:]) in cpus:
                    fields = [int(v) for v in rest.split()]
                    ticks += sum(fields[i] for i in (0, 1, 2, 5, 6, 7) if i < len(fields))
    except OSError:
        return None
    return ticks / _CLOCK_TICKS


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


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
    # Other processes' CPU use (None: not watched), read every load_interval_s on the step thread (one
    # /proc/stat read, ~18 us on the 2-core host: under 0.01% of the time): over half a core beyond the
    # cores we leave spare means contention, and a change either way triggers a probe at once.
    load: OtherCpuLoad | None = None
    load_interval_s: float = 0.25
    current: int = 0
    last_tuned: float | None = None  # None: the clock starts at the first call
    _load_checked: float = 0.0
    _others: float = 0.0  # the last reading of load
    _contended: bool | None = None
    _up_votes: int = 0  # probes in a row that favoured more threads than now
    _down_votes: int = 0  # ... and fewer
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
        if len(self.candidates) == 1:
            return self.current
        changed = self._load_changed(now)
        if now - self.last_tuned < self.interval_s and not changed:
            return self.current
        self.last_tuned = now
        # While other processes hold our cores, thread counts that would share a core with them are not
        # even probed: a ~1 ms probe can run unpreempted and read them as fast (seen beside a busy
        # neighbour: 2 threads probed 1.2 ms against 1.9 for 1, then ran 2.3x slower).
        candidates = [n for n in self.candidates if n <= self._thread_cap()] or [1]
        times = {n: self._probe(n) for n in candidates} if len(candidates) > 1 else {}
        choice = candidates[-1]
        for n in reversed(candidates[:-1]):
            if times[n] * self.margin < times[choice]:
                choice = n
        # A move against what the CPU load says waits for a second probe in a row: up while others hold
        # our cores (beside a busy neighbour a probe of more threads still reads fast now and then), down
        # while they are free (a probe can land on a burst of our own HTTP work). Each wrong flip cost a
        # whole interval of slow steps. Without a load reading, down at once and up on a second probe.
        self._up_votes = self._up_votes + 1 if choice > self.current else 0
        self._down_votes = self._down_votes + 1 if choice < self.current else 0
        if choice > self.current and self._up_votes < 2 and self._contended is not False:
            choice = self.current
        if choice < self.current and self._down_votes < 2 and self._contended is False:
            choice = self.current
        if choice != self.current:
            logger.info(
                "CPU threads %d -> %d (%s)", self.current, choice,
                ", ".join(f"{n} threads {t * 1e3:.1f} ms" for n, t in times.items())
                or f"other processes use {self._others:.2f} cores",
            )
        self.current = choice
        torch.set_num_threads(choice)
        self.history.append((now, times, choice))
        del self.history[:-100]
        return choice

    def _spare_cpus(self) -> int:
        """CPUs we may run on beyond our threads: others can use that many without contending."""
        return max(0, len(self.load.cpus) - self.max_threads) if self.load is not None else 0

    def _thread_cap(self) -> int:
        """All threads, or under contention as many as leave the other processes' share of our cores."""
        if not self._contended:
            return self.max_threads
        return max(1, self.max_threads - math.ceil(self._others - self._spare_cpus() - 0.5))

    def _load_changed(self, now: float) -> bool:
        """Whether other processes started or stopped contending for our CPUs since the last check."""
        if self.load is None or now - self._load_checked < self.load_interval_s:
            return False
        self._load_checked = now
        others = self.load.read(now)
        if others is None:
            return False
        self._others = others
        contended = others > self._spare_cpus() + 0.5
        changed = self._contended is not None and contended != self._contended
        if changed:
            logger.debug("other processes use %.2f cores of %d: %s", others, len(self.load.cpus),
                         "contended" if contended else "free")
        self._contended = contended
        return changed


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
