"""Desired replica count from recent fleet metrics. Pure: no clock, no I/O; the caller passes time.

Policy
------
Sizing. Demand D is the fleet's outstanding requests (running + waiting). A replica is sized to run
`replica_concurrency * target_utilisation` of them, plus square-root staffing for Poisson noise:
`needed = ceil((D + noise_headroom * sqrt(D)) / (replica_concurrency * target_utilisation))`. A small
fleet's load is noisier relative to its capacity, so it gets relatively more headroom; without it,
scaling in to one or two replicas put the p95 right back over the up threshold. The headroom
(1 - target_utilisation) absorbs bursts while new replicas cold-start.

Scale up (checked on every observation, subject to `up_cooldown_s` since the last scale-up) when
any pressure signal crosses its *up* threshold:
  * waiting per ready replica > `up_queue_per_replica`,
  * p95 TTFT > `up_latency_ratio` x `ttft_p95_target_s`, or p95 e2e > same ratio x `e2e_p95_target_s`,
  * KV usage > `up_kv_usage`, or utilisation > `up_utilisation`.
The new count is `max(needed, current + 1)`, at most `max_step_up` above current. The `+1` step
(a latency or KV signal with no queue to size from) is only taken once every replica asked for
earlier has been ready for `settle_s`: while replicas cold-start, and until their effect shows in
the recent-latency window, the symptoms persist, and stacking +1s on them would overshoot.

Scale down (subject to `down_cooldown_s` since the last change of either direction) only when
every observation in the last `down_window_s` was calm: no signal above its *down* threshold
(`down_queue_per_replica`, `down_latency_ratio`, `down_kv_usage`, `down_utilisation`). The new
count is the `needed` for the *largest* demand in that window, at most `max_step_down` below
current. The gap between up and down thresholds, the window's maximum, and the longer down
cooldown are the hysteresis that keeps the count from flapping.

Flap guard. Demand measured in concurrent requests is not invariant to the fleet size (fewer
replicas serve each request more slowly, so more are outstanding), so a scale-in can be wrong.
A pressure scale-up within `flap_window_s` of a scale-in marks it so: scaling in to that size
again is held off for `flap_hold_s`, doubling on each repeat (up to 4x). Borderline load settles
one replica above the size that proved too small instead of oscillating. The hold is one replica
above that size, never the (possibly burst-sized) count the scale-up reached, so a burst that
follows a scale-in costs at most one replica-hold.

Floor. Never below `min_replicas` (the warm pool: replicas kept up so a burst has somewhere to go
during a cold start) nor below any `ScheduledPeak` whose window, opened `lead_s` early, covers the
time of day: predictable ramps are pre-scaled before they arrive rather than chased after. Raising
the floor ignores cooldowns. Never above `max_replicas`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

DAY_S = 86400.0


@dataclass(frozen=True)
class FleetMetrics:
    t: float  # seconds; t % 86400 is the (UTC) time of day the schedule is matched against
    replicas: int  # ready replicas serving traffic now
    queue_depth: float  # requests waiting, summed over the fleet
    running: float  # requests being decoded, summed over the fleet
    ttft_p95_s: float = 0.0  # recent p95 time to first token
    e2e_p95_s: float = 0.0  # recent p95 end-to-end latency
    kv_usage: float = 0.0  # mean KV cache usage fraction over ready replicas
    utilisation: float = 0.0  # mean busy fraction over ready replicas (0..1)


@dataclass(frozen=True)
class ScheduledPeak:
    """A known busy window, e.g. 09:00-12:00 UTC: `start_s`/`end_s` are seconds of the day."""

    start_s: float
    end_s: float
    replicas: int
    lead_s: float = 600.0  # pre-scale this long before start: covers the cold start

    def active(self, t: float) -> bool:
        tod = t % DAY_S
        start = (self.start_s - self.lead_s) % DAY_S
        end = self.end_s % DAY_S
        return start <= tod < end if start <= end else (tod >= start or tod < end)


@dataclass
class AutoscalerConfig:
    min_replicas: int = 1
    max_replicas: int = 8
    replica_concurrency: int = 32  # concurrent requests one replica serves within the latency SLO
    target_utilisation: float = 0.6
    ttft_p95_target_s: float = 1.0
    e2e_p95_target_s: float = 10.0
    # Up thresholds (any one) ...
    up_queue_per_replica: float = 2.0
    up_latency_ratio: float = 0.9
    up_kv_usage: float = 0.9
    up_utilisation: float = 0.8
    # ... and down thresholds (all of them, over the whole down window).
    down_queue_per_replica: float = 0.0
    down_latency_ratio: float = 0.75
    down_kv_usage: float = 0.6
    down_utilisation: float = 0.4
    up_cooldown_s: float = 30.0
    down_cooldown_s: float = 300.0
    down_window_s: float = 300.0
    max_step_up: int = 4
    max_step_down: int = 2
    settle_s: float = 60.0  # about the latency window: how long new capacity takes to show in a p95
    noise_headroom: float = 1.0  # square-root staffing factor (0 = size on the mean alone)
    flap_window_s: float = 3600.0
    flap_hold_s: float = 1800.0
    schedule: tuple[ScheduledPeak, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        if not 1 <= self.min_replicas <= self.max_replicas:
            raise ValueError("need 1 <= min_replicas <= max_replicas")
        if not 0 < self.target_utilisation < self.up_utilisation:
            raise ValueError("target_utilisation must be below up_utilisation, or every scale-up re-triggers")
        if self.down_utilisation >= self.up_utilisation or self.down_latency_ratio >= self.up_latency_ratio:
            raise ValueError("down thresholds must sit below up thresholds (hysteresis)")


@dataclass
class Decision:
    desired: int
    reason: str


class Autoscaler:
    def __init__(self, config: AutoscalerConfig, initial: int | None = None):
        self.config = config
        self.desired = self._clamp(config.min_replicas if initial is None else initial, config.min_replicas)
        self.last_reason = "initial"
        self._last_up = -math.inf
        self._last_change = -math.inf
        self._window: deque[FleetMetrics] = deque()
        self._first_t: float | None = None
        self._ready_since: float | None = None  # when the fleet first reached `desired` since a change
        self._last_down = -math.inf
        self._last_down_to = 0
        self._hold_floor = 0  # flap guard: no scale-in below this ...
        self._hold_until = -math.inf  # ... until then
        self._hold_s = config.flap_hold_s

    def _clamp(self, n: int, floor: int) -> int:
        return max(floor, min(self.config.max_replicas, n))

    def floor(self, t: float) -> int:
        peaks = [p.replicas for p in self.config.schedule if p.active(t)]
        return max([self.config.min_replicas, *peaks])

    def needed(self, demand: float) -> int:
        c = self.config
        padded = demand + c.noise_headroom * math.sqrt(max(demand, 0.0))
        return max(1, math.ceil(padded / (c.replica_concurrency * c.target_utilisation)))

    def _pressure(self, m: FleetMetrics) -> str | None:
        c = self.config
        if m.queue_depth > c.up_queue_per_replica * max(m.replicas, 1):
            return "queue"
        if m.ttft_p95_s > c.up_latency_ratio * c.ttft_p95_target_s:
            return "ttft_p95"
        if m.e2e_p95_s > c.up_latency_ratio * c.e2e_p95_target_s:
            return "e2e_p95"
        if m.kv_usage > c.up_kv_usage:
            return "kv_usage"
        if m.utilisation > c.up_utilisation:
            return "utilisation"
        return None

    def _calm(self, m: FleetMetrics) -> bool:
        c = self.config
        return (
            m.queue_depth <= c.down_queue_per_replica * max(m.replicas, 1)
            and m.ttft_p95_s <= c.down_latency_ratio * c.ttft_p95_target_s
            and m.e2e_p95_s <= c.down_latency_ratio * c.e2e_p95_target_s
            and m.kv_usage <= c.down_kv_usage
            and m.utilisation <= c.down_utilisation
        )

    def observe(self, m: FleetMetrics) -> int:
        return self.decide(m).desired

    def decide(self, m: FleetMetrics) -> Decision:
        c = self.config
        self._window.append(m)
        if self._first_t is None:
            self._first_t = m.t
        while self._window and m.t - self._window[0].t > c.down_window_s:
            self._window.popleft()
        floor = self.floor(m.t)
        current = self.desired
        new, reason = current, "steady"
        if m.replicas < current:
            self._ready_since = None
        elif self._ready_since is None:
            self._ready_since = m.t
        settled = self._ready_since is not None and m.t - self._ready_since >= c.settle_s

        pressure = self._pressure(m)
        if pressure and m.t - self._last_up >= c.up_cooldown_s:
            target = self.needed(m.queue_depth + m.running)
            if settled:  # everything asked for is up and showing in the signals: a blind +1 is safe
                target = max(target, current + 1)
            target = min(target, current + c.max_step_up)
            if target > current:
                new, reason = target, f"up:{pressure}"
        elif (
            not pressure
            and m.t - self._last_change >= c.down_cooldown_s
            and self._window_covers(m.t)
            and all(self._calm(w) for w in self._window)
        ):
            peak_demand = max(w.queue_depth + w.running for w in self._window)
            target = max(self.needed(peak_demand), current - c.max_step_down)
            if m.t < self._hold_until:
                target = max(target, self._hold_floor)
            if target < current:
                new, reason = target, "down:calm"

        if new < floor:
            new, reason = floor, "floor:schedule" if floor > c.min_replicas else "floor:min"
        new = self._clamp(new, floor)
        if new != current:
            if new > current:
                self._last_up = m.t
                self._ready_since = None
                if reason.startswith("up:") and m.t - self._last_down <= c.flap_window_s:
                    self._hold_after_flap(m.t, self._last_down_to + 1)
            else:
                self._last_down, self._last_down_to = m.t, new
            self._last_change = m.t
            self.desired, self.last_reason = new, reason
        return Decision(self.desired, reason if new != current else "steady")

    def _hold_after_flap(self, t: float, size: int) -> None:
        # A flap soon after the last hold ended means the load is still borderline: hold longer.
        recent = t < self._hold_until + self._hold_s
        self._hold_s = min(self._hold_s * 2, 4 * self.config.flap_hold_s) if recent else self.config.flap_hold_s
        self._hold_floor, self._hold_until = size, t + self._hold_s

    def _window_covers(self, t: float) -> bool:
        # Scale in only on a full window of evidence, never on the first calm sample after a start.
        return self._first_t is not None and t - self._first_t >= self.config.down_window_s
