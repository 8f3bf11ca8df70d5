"""What the router knows about one replica, and how it reads a replica's /metrics page."""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

# The replica server exposes vLLM's metric names so dashboards and KEDA queries work for both.
WAITING = "vllm:num_requests_waiting"
RUNNING = "vllm:num_requests_running"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")  # new name first, old as fallback


class LatencyWindow:
    """Recent latency samples (seconds) over a sliding time window, for a p95 without a histogram."""

    def __init__(self, window_s: float = 60.0, max_samples: int = 2048):
        self.window_s = window_s
        self._samples: deque[tuple[float, float]] = deque(maxlen=max_samples)

    def add(self, value_s: float, now: float | None = None) -> None:
        self._samples.append((time.monotonic() if now is None else now, value_s))

    def p95(self, now: float | None = None) -> float:
        """0.0 when there are no recent samples: no evidence of slowness."""
        now = time.monotonic() if now is None else now
        while self._samples and now - self._samples[0][0] > self.window_s:
            self._samples.popleft()
        if not self._samples:
            return 0.0
        values = sorted(v for _, v in self._samples)
        return values[min(len(values) - 1, math.ceil(0.95 * len(values)) - 1)]


@dataclass
class ReplicaState:
    url: str
    healthy: bool = True
    waiting: int = 0  # from the last /metrics poll
    running: int = 0  # from the last /metrics poll
    kv_usage: float = 0.0  # fraction 0..1 from the last poll
    in_flight: int = 0  # requests this router has outstanding on the replica right now
    p95_latency_s: float = 0.0  # recent router-measured end-to-end p95
    weight: float = 1.0  # relative capacity (a bigger GPU gets a larger share)
    canary: bool = False
    retired: bool = False  # discovery dropped it; its metric series go once nothing is in flight
    # Router bookkeeping, not routing inputs.
    in_flight_at_poll: int = 0
    consecutive_failures: int = 0
    consecutive_successes: int = 0
    ejections: int = 0
    ttfb: LatencyWindow = field(default_factory=LatencyWindow, repr=False)
    e2e: LatencyWindow = field(default_factory=LatencyWindow, repr=False)

    @property
    def load(self) -> float:
        """Outstanding requests on the replica, kept current between polls.

        The poll is a snapshot; what the router has sent (or seen finish) since then is added to it.
        The router's own in-flight count is a floor: those requests are on the replica whatever the
        (possibly stale, possibly missing) metrics say.
        """
        since_poll = self.in_flight - self.in_flight_at_poll
        return float(max(self.in_flight, self.waiting + self.running + since_poll, 0))

    def apply_metrics(self, waiting: int, running: int, kv_usage: float) -> None:
        self.waiting, self.running, self.kv_usage = waiting, running, kv_usage
        self.in_flight_at_poll = self.in_flight


def parse_load_metrics(text: str) -> tuple[int, int, float]:
    """(waiting, running, kv_usage) from Prometheus text; absent metrics count as zero load.

    Samples are summed over label sets (one per model name) for the counts, and the largest KV
    usage is taken since one full pool is enough to make new requests wait.
    """
    waiting = running = 0.0
    kv = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == WAITING:
                waiting += sample.value
            elif sample.name == RUNNING:
                running += sample.value
            elif sample.name in KV_USAGE:
                kv = max(kv, sample.value)
    return int(waiting), int(running), min(max(kv, 0.0), 1.0)
