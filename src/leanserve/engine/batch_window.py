"""The adaptive batching window: how long new requests may wait so that close arrivals share a prefill.

Holding a new request's prefill for a moment lets requests that arrive close together enter the batch
in one prefill pass: fewer slow mixed steps for the sequences already decoding, and larger, more
efficient prefill GEMMs. The price is the wait itself, which is pure loss when nobody else is coming.
So the window follows the load:

- **Arrival rate.** ``rate`` is an exponentially decayed count of arrivals (half-life
  ``rate_half_life_s``). The expected number of further arrivals during a full window is
  ``rate * max_wait``; the window opens in proportion to it and is fully open once that reaches
  ``saturation_arrivals``. At 0.5 req/s and a 20 ms maximum that is 0.01 expected arrivals: below
  ``min_load`` the window is exactly 0, so a lone request starts at once.
- **Occupancy.** A batch that is already busy (running sequences near ``max_num_seqs``) gains more from
  merging prefills, since every prefill step slows all of its decodes: the load is the larger of the
  rate term and the running fraction.
- **Queue depth.** Waiting is pointless when the queue already holds enough work to fill the step's
  token budget or the free sequence slots: then the scheduler admits immediately, whatever the window.

``adaptive=False`` pins the window at ``max_batch_wait_ms`` (the fixed-window baseline), and
``max_batch_wait_ms=0`` disables waiting altogether.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class BatchWindowConfig:
    max_batch_wait_ms: float = 20.0
    adaptive: bool = True
    rate_half_life_s: float = 2.0
    saturation_arrivals: float = 1.0
    min_load: float = 0.1


class BatchWindow:
    def __init__(self, config: BatchWindowConfig) -> None:
        self.config = config
        self._count = 0.0  # decayed number of arrivals
        self._last = 0.0
        self.current_ms = 0.0  # the window last applied, exported as a metric

    def observe_arrival(self, now: float) -> None:
        self._count = self._decayed(now) + 1.0
        self._last = now

    def _decayed(self, now: float) -> float:
        if self._count == 0.0:
            return 0.0
        return self._count * 0.5 ** ((now - self._last) / self.config.rate_half_life_s)

    def arrival_rate(self, now: float) -> float:
        """Arrivals per second: a steady rate r keeps the decayed count at r * half_life / ln 2."""
        return self._decayed(now) * math.log(2) / self.config.rate_half_life_s

    def window_s(self, now: float, running_fraction: float) -> float:
        c = self.config
        max_wait = c.max_batch_wait_ms / 1000.0
        if max_wait <= 0:
            return 0.0
        if not c.adaptive:
            return max_wait
        expected = self.arrival_rate(now) * max_wait / c.saturation_arrivals
        load = min(1.0, max(expected, running_fraction))
        return 0.0 if load < c.min_load else max_wait * load

    def hold_seconds(
        self,
        now: float,
        oldest_arrival: float,
        running_fraction: float,
        queue_fills_step: bool,
    ) -> float:
        """How much longer the oldest new request should wait before admission (0 = admit now)."""
        window = self.window_s(now, running_fraction)
        self.current_ms = window * 1000.0
        if window == 0.0 or queue_fills_step:
            return 0.0
        return max(0.0, oldest_arrival + window - now)
