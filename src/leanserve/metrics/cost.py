"""Serving cost arithmetic, shared by the live ``/metrics`` gauges and ``leanserve cost``.

Pure functions and dataclasses only: no clocks, no I/O, so every figure is reproducible in a test.
Prices are US dollars; throughputs are per replica (the unit the benchmark measures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

SECONDS_PER_DAY = 86_400.0

# Assumptions used when nothing better is configured. They are placeholders to make the numbers
# readable, not quotes: pass real prices with settings.cost / the CLI flags.
DEFAULT_USD_PER_GPU_HOUR = 2.00  # a rented datacenter GPU, on-demand, order of magnitude
DEFAULT_USD_PER_HOST_HOUR = 0.20  # a small CPU host serving the embedded model
DEFAULT_TARGET_UTILIZATION = 0.7  # headroom for peaks and failover: plan replicas at 70% busy


def hourly_price(
    device_type: str,
    usd_per_gpu_hour: float,
    num_gpus: int,
    usd_per_host_hour: float | None = None,
) -> float:
    """What one server costs per hour: GPUs x price on CUDA, the host's price on CPU.

    On CPU the configured GPU-hour price is read as the host's hourly price unless a separate host
    price is given, so one setting works for both deployments.
    """
    if device_type == "cuda":
        return max(usd_per_gpu_hour, 0.0) * max(num_gpus, 1)
    price = usd_per_host_hour if usd_per_host_hour is not None else usd_per_gpu_hour
    return max(price, 0.0)


def accrued_usd(usd_per_hour: float, seconds: float) -> float:
    return usd_per_hour * max(seconds, 0.0) / 3600.0


def usd_per_1k_requests(usd: float, num_requests: int | float) -> float:
    """Cost of a thousand requests; NaN when none finished (undefined, not free)."""
    return usd / num_requests * 1000.0 if num_requests > 0 else math.nan


def usd_per_1m_tokens(usd: float, num_tokens: int | float) -> float:
    return usd / num_tokens * 1e6 if num_tokens > 0 else math.nan


# ---- fleet planning (the CLI) -------------------------------------------------------------------
@dataclass
class Throughput:
    """One replica's measured (or assumed) capacity."""

    output_tok_s: float
    req_s: float | None = None  # None: derive from tokens per request when needed
    gpus_per_replica: int = 1

    def scaled(self, gain: float) -> Throughput:
        """The same replica made ``gain`` times faster (tokens per request unchanged)."""
        req_s = self.req_s * gain if self.req_s is not None else None
        return Throughput(self.output_tok_s * gain, req_s, self.gpus_per_replica)

    @property
    def output_tokens_per_request(self) -> float | None:
        if self.req_s is None or self.req_s <= 0:
            return None
        return self.output_tok_s / self.req_s


@dataclass
class Traffic:
    """Daily demand. Give requests (with tokens per request) or output tokens directly."""

    requests_per_day: float | None = None
    output_tokens_per_day: float | None = None

    def resolve(self, tokens_per_request: float | None) -> tuple[float, float]:
        """Return (requests/day, output tokens/day), filling the missing one from the ratio."""
        reqs, toks = self.requests_per_day, self.output_tokens_per_day
        if reqs is None and toks is None:
            raise ValueError("traffic needs requests per day or output tokens per day")
        if toks is None:
            if tokens_per_request is None:
                raise ValueError("output tokens per request unknown: give req/s or tokens per day")
            toks = reqs * tokens_per_request
        if reqs is None:
            if not tokens_per_request:
                raise ValueError("output tokens per request unknown: give requests per day or req/s")
            reqs = toks / tokens_per_request
        return float(reqs), float(toks)


@dataclass
class FleetPlan:
    replicas: int
    gpus: int
    usd_per_day: float
    usd_per_1k_requests: float
    usd_per_1m_tokens: float
    requests_per_day: float
    output_tokens_per_day: float
    utilization: float  # how busy the planned fleet is on average


def plan_fleet(
    throughput: Throughput,
    traffic: Traffic,
    usd_per_gpu_hour: float,
    target_utilization: float = DEFAULT_TARGET_UTILIZATION,
) -> FleetPlan:
    """Replicas needed so the average load stays at ``target_utilization`` of measured capacity.

    Raises ValueError on inputs with no meaningful plan (NaN, infinite, zero or negative), which
    would otherwise come out as NaN or negative dollars, or as one replica for infinite capacity.
    """
    _require_positive("throughput", throughput.output_tok_s)
    if throughput.req_s is not None:
        _require_positive("requests/s", throughput.req_s)
    if throughput.gpus_per_replica < 1:
        raise ValueError(f"GPUs per replica must be at least 1, got {throughput.gpus_per_replica}")
    _require_non_negative("price per GPU-hour", usd_per_gpu_hour)
    if not 0.0 < target_utilization <= 1.0:
        raise ValueError("target utilization must be in (0, 1]")
    reqs, toks = traffic.resolve(throughput.output_tokens_per_request)
    _require_positive("requests per day", reqs)
    _require_positive("output tokens per day", toks)
    demand_tok_s = toks / SECONDS_PER_DAY
    replicas = max(1, math.ceil(demand_tok_s / (throughput.output_tok_s * target_utilization) - 1e-9))
    gpus = replicas * throughput.gpus_per_replica
    usd_day = gpus * usd_per_gpu_hour * 24.0
    return FleetPlan(
        replicas=replicas,
        gpus=gpus,
        usd_per_day=usd_day,
        usd_per_1k_requests=usd_per_1k_requests(usd_day, reqs),
        usd_per_1m_tokens=usd_per_1m_tokens(usd_day, toks),
        requests_per_day=reqs,
        output_tokens_per_day=toks,
        utilization=demand_tok_s / (replicas * throughput.output_tok_s),
    )


def _require_positive(what: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number greater than 0, got {value!r}")


def _require_non_negative(what: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{what} must be a finite number of at least 0, got {value!r}")


# ---- the four levers ----------------------------------------------------------------------------
@dataclass
class Lever:
    name: str
    gain: float  # multiplier on throughput per GPU
    assumption: str


def default_levers() -> list[Lever]:
    """Assumed throughput-per-GPU gains of each lever, applied in this order, each on top of the last.

    These are planning assumptions for a memory-bound decoder on one GPU, not measurements; replace
    them with your own benchmark ratios (``--*-gain`` flags) when you have them.
    """
    return [
        Lever("continuous batching", 8.0,
              "one request at a time -> continuous batching: decode is memory-bound, so a batch of "
              "many sequences costs little more per step than one"),
        Lever("paged KV cache + prefix cache", 1.5,
              "contiguous per-request KV reservations -> paged blocks with prefix reuse: fewer "
              "wasted slots, so more sequences fit in the same memory"),
        Lever("INT4 weights", 1.8,
              "16-bit -> 4-bit weights: a quarter of the weight bytes read per step and more memory "
              "left for KV; below the 4x byte ratio because of dequant cost and KV traffic"),
        Lever("smart scheduling", 1.25,
              "FIFO + fixed fleet -> SLO-aware scheduling, prefix-affinity routing and autoscaling: "
              "the fleet can run busier without breaking latency targets"),
    ]


@dataclass
class SavingsRow:
    label: str
    tok_s_per_gpu: float
    gpus: int
    usd_per_day: float
    usd_per_1m_tokens: float
    saving_vs_baseline: float  # fraction of the baseline's daily cost
    assumed: bool = True


@dataclass
class SavingsTable:
    rows: list[SavingsRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def savings_table(
    baseline: Throughput,
    traffic: Traffic,
    usd_per_gpu_hour: float,
    levers: list[Lever],
    target_utilization: float = DEFAULT_TARGET_UTILIZATION,
    measured: Throughput | None = None,
    baseline_assumed: bool = False,
) -> SavingsTable:
    """Cost at the baseline, then with each lever added cumulatively, then (if given) as measured."""
    table = SavingsTable()
    for lever in levers:
        _require_positive(f"the gain of {lever.name}", lever.gain)
    base_plan = plan_fleet(baseline, traffic, usd_per_gpu_hour, target_utilization)

    def row(label: str, tp: Throughput, assumed: bool) -> SavingsRow:
        plan = plan_fleet(tp, traffic, usd_per_gpu_hour, target_utilization)
        return SavingsRow(
            label=label,
            tok_s_per_gpu=tp.output_tok_s / tp.gpus_per_replica,
            gpus=plan.gpus,
            usd_per_day=plan.usd_per_day,
            usd_per_1m_tokens=plan.usd_per_1m_tokens,
            # At a price of 0 nothing costs anything, so nothing is saved either.
            saving_vs_baseline=1.0 - plan.usd_per_day / base_plan.usd_per_day if base_plan.usd_per_day else 0.0,
            assumed=assumed,
        )

    table.rows.append(row("baseline", baseline, baseline_assumed))
    current = baseline
    for lever in levers:
        current = current.scaled(lever.gain)
        table.rows.append(row(f"+ {lever.name}", current, True))
    if measured is not None:
        table.rows.append(row("measured (benchmark)", measured, False))
        predicted = current.output_tok_s / current.gpus_per_replica
        actual = measured.output_tok_s / measured.gpus_per_replica
        if predicted > 0 and abs(actual / predicted - 1.0) > 0.25:
            table.notes.append(
                f"the assumed lever gains predict {predicted:,.0f} tok/s per GPU but the benchmark "
                f"measured {actual:,.0f}: adjust the --*-gain assumptions to your measurements"
            )
    return table


def combined_gain(levers: list[Lever]) -> float:
    return math.prod(lever.gain for lever in levers)
