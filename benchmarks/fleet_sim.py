"""Trace-driven cost simulator: how many GPU-hours does each scaling policy spend on a day of traffic?

A seeded day of diurnal traffic (a predictable 09:00 ramp, an evening hump, random bursts) is
served by N simulated replicas whose throughput and latency at a given concurrency come from a
serving-benchmark service curve. Four fleets are compared:

  static      sized for the day's peak minute at the SLO operating point, up all day
  reactive    HPA-style on request rate (scale up at once, scale down after a 5 min window)
  ours        leanserve.router.autoscaler on queue depth + p95 TTFT/e2e (imported, not re-implemented)
  ours+pre    the same, plus a warm pool and a pre-scale before the known 09:00 ramp

Model (a fluid, 1-second time step): requests in the system are spread evenly over ready replicas
(what least-loaded routing does); each replica serves up to the curve's largest concurrency and
the rest queue. Completions per second = ready x req_s(concurrency). A request arriving in a step
sees queue wait (queue / throughput) plus the curve's p95 TTFT / e2e at that concurrency, so the
day's p95 is a p95 over per-step p95s: slightly pessimistic for every policy alike. New replicas
bill from the moment they are asked for and serve after the cold start.

Usage: python benchmarks/fleet_sim.py [--service-curve FILE] [--cold-start 45] [--seed 0]
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from leanserve.router.autoscaler import Autoscaler, AutoscalerConfig, FleetMetrics, ScheduledPeak

DAY_S = 86400
EVAL_S = 15  # how often a controller runs (KEDA/HPA sync period)
WINDOW_S = 60  # the recent window the latency signals are computed over

# One GPU serving an 8B-class model with INT4 weights, ~256 output tokens a request. Used when no
# --service-curve is given; a real curve comes from the serving benchmark's JSON output.
DEFAULT_CURVE = [
    {"concurrency": 1, "req_s": 0.42, "output_tok_s": 108, "ttft_p50_ms": 35, "ttft_p95_ms": 55, "e2e_p95_ms": 2500},
    {"concurrency": 4, "req_s": 1.6, "output_tok_s": 410, "ttft_p50_ms": 45, "ttft_p95_ms": 80, "e2e_p95_ms": 2600},
    {"concurrency": 8, "req_s": 3.0, "output_tok_s": 770, "ttft_p50_ms": 55, "ttft_p95_ms": 110, "e2e_p95_ms": 2800},
    {"concurrency": 16, "req_s": 5.4, "output_tok_s": 1380, "ttft_p50_ms": 80, "ttft_p95_ms": 170,
     "e2e_p95_ms": 3100},
    {"concurrency": 32, "req_s": 8.9, "output_tok_s": 2280, "ttft_p50_ms": 140, "ttft_p95_ms": 320,
     "e2e_p95_ms": 3800},
    {"concurrency": 64, "req_s": 12.6, "output_tok_s": 3230, "ttft_p50_ms": 320, "ttft_p95_ms": 900,
     "e2e_p95_ms": 5500},
    {"concurrency": 128, "req_s": 14.8, "output_tok_s": 3790, "ttft_p50_ms": 900, "ttft_p95_ms": 2600,
     "e2e_p95_ms": 9400},
]


# ---- service curve -----------------------------------------------------------------------------


@dataclass
class ServiceCurve:
    concurrency: np.ndarray
    req_s: np.ndarray
    ttft_p95_s: np.ndarray
    e2e_p95_s: np.ndarray
    source: str
    grid: float = 0.25  # lookup-table resolution in concurrency

    def __post_init__(self) -> None:
        c = np.arange(0.0, self.max_concurrency + self.grid, self.grid)
        c1 = self.concurrency[0]
        # Below the first measured point throughput scales linearly (each request at that latency).
        self._thr = np.where(c < c1, self.req_s[0] * c / c1, np.interp(c, self.concurrency, self.req_s)).tolist()
        self._ttft = np.interp(c, self.concurrency, self.ttft_p95_s).tolist()
        self._e2e = np.interp(c, self.concurrency, self.e2e_p95_s).tolist()

    @property
    def max_concurrency(self) -> float:
        return float(self.concurrency[-1])

    def at(self, c: float) -> tuple[float, float, float]:
        """(req/s, p95 TTFT s, p95 e2e s) for one replica at concurrency c (capped at the curve's max)."""
        i = int(min(c, self.max_concurrency) / self.grid + 0.5)
        return self._thr[i], self._ttft[i], self._e2e[i]

    def operating_point(self, slo_ttft_s: float, slo_e2e_s: float) -> float:
        """Largest concurrency at which one replica still meets both p95 targets."""
        ok = [i * self.grid for i in range(len(self._thr))
              if self._ttft[i] <= slo_ttft_s and self._e2e[i] <= slo_e2e_s and i > 0]
        if not ok:
            raise SystemExit(f"the service curve ({self.source}) misses the SLO even at concurrency 1")
        return max(ok)


def load_curve(path: str | None) -> ServiceCurve:
    if path is None:
        runs, source = DEFAULT_CURVE, "built-in default curve (8B INT4 on one GPU, illustrative)"
    else:
        text = Path(path).read_text()
        try:
            data = json.loads(text)
            runs = data if isinstance(data, list) else [data]
        except json.JSONDecodeError:  # one JSON object per line, as the benchmark prints them
            runs = [json.loads(line) for line in text.splitlines() if line.strip().startswith("{")]
        source = path
    need = ("concurrency", "req_s", "ttft_p95_ms", "e2e_p95_ms")
    runs = [r for r in runs if all(k in r for k in need)]
    if not runs:
        raise SystemExit(f"{source}: no run has all of {', '.join(need)}")
    by_c = {float(r["concurrency"]): r for r in runs}  # the last run at a concurrency wins
    cs = sorted(by_c)
    return ServiceCurve(
        concurrency=np.array(cs),
        req_s=np.array([by_c[c]["req_s"] for c in cs], dtype=float),
        ttft_p95_s=np.array([by_c[c]["ttft_p95_ms"] for c in cs], dtype=float) / 1000,
        e2e_p95_s=np.array([by_c[c]["e2e_p95_ms"] for c in cs], dtype=float) / 1000,
        source=source,
    )


# ---- traffic -----------------------------------------------------------------------------------


@dataclass
class Trace:
    arrivals: np.ndarray  # requests arriving in each second of the day
    expected: np.ndarray  # the predictable part of the rate (what yesterday's graph shows)
    ramp_start_s: float  # the known morning ramp


def make_trace(seed: int, peak_rps: float) -> Trace:
    rng = np.random.default_rng(seed)
    t = np.arange(DAY_S) / 3600.0  # hours
    night = 0.12
    # Business hours: a sharp ramp at 09:00 (people log on), a lunch dip, a slow afternoon decay.
    ramp = 1 / (1 + np.exp(-(t - 9.1) * 12))
    work = ramp * (0.85 - 0.15 * np.exp(-((t - 12.8) ** 2) / 0.3) - 0.25 * np.clip((t - 15) / 5, 0, 1))
    evening = 0.55 * np.exp(-((t - 20.5) ** 2) / 1.5)  # consumer evening hump
    shape = night + np.maximum(work, evening) * (1 - night) + 0.05 * np.sin(t / 24 * 2 * np.pi)
    expected = peak_rps * shape / shape.max()
    # Slow, unpredictable drift (+-10%) and random bursts (a viral link, a batch job): x1.3-2.0
    # for 2-12 minutes, a dozen a day.
    drift = np.exp(np.cumsum(rng.normal(0, 0.002, DAY_S)))
    drift = np.clip(drift / drift.mean(), 0.9, 1.1)
    rate = expected * drift
    for _ in range(rng.poisson(12)):
        start = int(rng.uniform(6 * 3600, 23 * 3600))
        length = int(rng.uniform(120, 720))
        rate[start:start + length] *= rng.uniform(1.3, 2.0)
    return Trace(arrivals=rng.poisson(rate), expected=expected, ramp_start_s=9 * 3600)


# ---- controllers -------------------------------------------------------------------------------


@dataclass
class Signals:
    t: float
    ready: int
    queued: float
    running: float
    rate_rps: float  # mean arrival rate over the recent window
    ttft_p95_s: float
    e2e_p95_s: float
    kv_usage: float
    utilisation: float


Controller = Callable[[Signals], int]


def static(n: int) -> Controller:
    return lambda s: n


def reactive_rate(capacity_rps: float, target: float = 0.7, window_s: float = 300) -> Controller:
    """HPA on a requests-per-second metric: desired = ceil(rate / (capacity x target)); up at once,
    down only to the largest recommendation of the last 5 minutes (HPA's stabilisation window)."""
    recent: deque[tuple[float, int]] = deque()

    def decide(s: Signals) -> int:
        want = max(1, math.ceil(s.rate_rps / (capacity_rps * target)))
        recent.append((s.t, want))
        while recent[0][0] < s.t - window_s:
            recent.popleft()
        return max(w for _, w in recent)

    return decide


def ours(config: AutoscalerConfig) -> Controller:
    scaler = Autoscaler(config)

    def decide(s: Signals) -> int:
        return scaler.observe(FleetMetrics(
            t=s.t, replicas=s.ready, queue_depth=s.queued, running=s.running, ttft_p95_s=s.ttft_p95_s,
            e2e_p95_s=s.e2e_p95_s, kv_usage=s.kv_usage, utilisation=s.utilisation,
        ))

    return decide


# ---- simulation --------------------------------------------------------------------------------


@dataclass
class Result:
    name: str
    gpu_hours: float
    requests: int
    ttft_p95_s: float
    e2e_p95_s: float
    violation_minutes: int  # minutes whose p95 TTFT or e2e broke the SLO
    late_fraction: float  # share of requests that saw a p95 over the SLO
    replicas: np.ndarray = field(repr=False)  # provisioned, per minute
    minute_e2e_p95: np.ndarray = field(repr=False)


def weighted_p95(values: np.ndarray, weights: np.ndarray) -> float:
    if weights.sum() <= 0:
        return 0.0
    order = np.argsort(values)
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.95 * cum[-1])])


def simulate(name: str, trace: Trace, curve: ServiceCurve, controller: Controller, cold_start_s: float,
             op_concurrency: float, slo: tuple[float, float], initial: int) -> Result:
    arrivals = trace.arrivals.tolist()
    ready = initial  # the day starts with last night's fleet already up
    booting: deque[float] = deque()  # ready-at times
    in_system = 0.0
    gpu_s = 0.0
    ttft = np.zeros(DAY_S)
    e2e = np.zeros(DAY_S)
    provisioned = np.zeros(DAY_S)
    c_max = curve.max_concurrency
    for t in range(DAY_S):
        while booting and booting[0] <= t:
            booting.popleft()
            ready += 1
        if t % EVAL_S == 0 and t:
            lo = max(0, t - WINDOW_S)
            w = trace.arrivals[lo:t]
            c_now = min(in_system / ready, c_max)
            sig = Signals(
                t=float(t), ready=ready, queued=max(0.0, in_system - c_now * ready), running=c_now * ready,
                rate_rps=float(w.mean()), ttft_p95_s=weighted_p95(ttft[lo:t], w),
                e2e_p95_s=weighted_p95(e2e[lo:t], w), kv_usage=c_now / c_max,
                utilisation=min(1.0, c_now / op_concurrency),
            )
            want = max(1, controller(sig))
            have = ready + len(booting)
            for _ in range(want - have):
                booting.append(t + cold_start_s)
            for _ in range(have - want):  # cancel a boot before stopping a serving replica
                if booting:
                    booting.pop()
                elif ready > 1:
                    ready -= 1
        in_system += arrivals[t]
        c = min(in_system / ready, c_max)
        thr, ttft_c, e2e_c = curve.at(c)
        thr *= ready
        wait = max(0.0, in_system - c * ready) / thr if thr > 0 else 0.0
        ttft[t] = wait + ttft_c
        e2e[t] = wait + e2e_c
        in_system = max(0.0, in_system - thr)
        provisioned[t] = ready + len(booting)
        gpu_s += provisioned[t]
    w = trace.arrivals.astype(float)
    slo_ttft, slo_e2e = slo
    minutes = DAY_S // 60
    m_ttft = np.array([weighted_p95(ttft[i * 60:(i + 1) * 60], w[i * 60:(i + 1) * 60]) for i in range(minutes)])
    m_e2e = np.array([weighted_p95(e2e[i * 60:(i + 1) * 60], w[i * 60:(i + 1) * 60]) for i in range(minutes)])
    late = ((ttft > slo_ttft) | (e2e > slo_e2e)).astype(float)
    return Result(
        name=name, gpu_hours=gpu_s / 3600, requests=int(w.sum()),
        ttft_p95_s=weighted_p95(ttft, w), e2e_p95_s=weighted_p95(e2e, w),
        violation_minutes=int(((m_ttft > slo_ttft) | (m_e2e > slo_e2e)).sum()),
        late_fraction=float((late * w).sum() / w.sum()),
        replicas=provisioned.reshape(minutes, 60).max(axis=1), minute_e2e_p95=m_e2e,
    )


# ---- report ------------------------------------------------------------------------------------


def plot(results: list[Result], trace: Trace, slo_e2e: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hours = np.arange(DAY_S // 60) / 60
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 7), sharex=True)
    rate = trace.arrivals.reshape(-1, 60).mean(axis=1)
    top.fill_between(hours, rate / rate.max() * max(r.replicas.max() for r in results), color="0.88",
                     label="request rate (scaled)")
    for r in results:
        top.step(hours, r.replicas, where="post", label=f"{r.name} ({r.gpu_hours:.0f} GPU-h)")
    top.set_ylabel("replicas provisioned")
    top.legend(loc="upper left", fontsize=8)
    for r in results:
        bottom.plot(hours, r.minute_e2e_p95, lw=0.8, label=r.name)
    bottom.axhline(slo_e2e, color="red", ls="--", lw=1, label="p95 e2e SLO")
    bottom.set_yscale("log")
    bottom.set_ylabel("p95 e2e latency per minute (s)")
    bottom.set_xlabel("hour of day")
    bottom.set_xlim(0, 24)
    bottom.legend(loc="upper left", fontsize=8)
    fig.suptitle("leanserve fleet simulation: replicas and latency over one day")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--service-curve", help="serving-benchmark JSON (object, list, or one object a line)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-rps", type=float, default=60.0, help="diurnal peak request rate (before bursts)")
    p.add_argument("--cold-start", type=float, default=45.0, help="seconds from scale-up to serving (30-60)")
    p.add_argument("--gpu-cost", type=float, default=2.5, help="$ per GPU-hour")
    p.add_argument("--slo-ttft-p95", type=float, default=1.0, help="seconds")
    p.add_argument("--slo-e2e-p95", type=float, default=5.0, help="seconds")
    p.add_argument("--warm-pool", type=int, default=2, help="ours+pre: replicas always up")
    p.add_argument("--plot", default=str(Path(__file__).parent / "results" / "fleet_sim.png"))
    args = p.parse_args(argv)
    started = time.monotonic()

    curve = load_curve(args.service_curve)
    slo = (args.slo_ttft_p95, args.slo_e2e_p95)
    op_c = curve.operating_point(*slo)
    op_rps = curve.at(op_c)[0]
    trace = make_trace(args.seed, args.peak_rps)
    peak_minute_rps = float(trace.arrivals.reshape(-1, 60).mean(axis=1).max())
    n_static = math.ceil(peak_minute_rps / op_rps)
    print(f"service curve: {curve.source}")
    print(f"SLO p95 TTFT <= {slo[0]:.2f}s, p95 e2e <= {slo[1]:.2f}s -> one replica serves up to concurrency "
          f"{op_c:.0f} ({op_rps:.1f} req/s) within it")
    print(f"trace: seed {args.seed}, {int(trace.arrivals.sum()):,} requests, peak minute {peak_minute_rps:.1f} "
          f"req/s, cold start {args.cold_start:.0f}s, ${args.gpu_cost:.2f}/GPU-hour")

    scaler = AutoscalerConfig(
        min_replicas=1, max_replicas=2 * n_static, replica_concurrency=max(1, int(op_c)),
        target_utilisation=0.6, ttft_p95_target_s=slo[0], e2e_p95_target_s=slo[1],
    )
    # The pre-scale floor is what yesterday's graph shows for the first hour after the ramp.
    ramp = int(trace.ramp_start_s)
    ramp_level = float(trace.expected[ramp:ramp + 3600].max())
    peak = ScheduledPeak(start_s=ramp, end_s=ramp + 3600,
                         replicas=math.ceil(ramp_level / (op_rps * scaler.target_utilisation)),
                         lead_s=args.cold_start + 300)
    pre = AutoscalerConfig(**{**scaler.__dict__, "min_replicas": args.warm_pool, "schedule": (peak,)})
    controllers: list[tuple[str, Controller]] = [
        ("static", static(n_static)),
        ("reactive", reactive_rate(op_rps)),
        ("ours", ours(scaler)),
        ("ours+pre", ours(pre)),
    ]
    initial = max(1, math.ceil(float(trace.expected[0]) / (op_rps * scaler.target_utilisation)))
    results = [simulate(name, trace, curve, ctl, args.cold_start, op_c, slo, n_static if name == "static"
                        else initial) for name, ctl in controllers]

    base = results[0]
    print(f"\n{'policy':<10} {'GPU-h':>7} {'saving':>7} {'$/day':>8} {'$/1K req':>9} {'p95 TTFT':>9} "
          f"{'p95 e2e':>8} {'SLO':>4} {'viol.min':>8} {'late%':>6}")
    rows = {}
    for r in results:
        met = r.ttft_p95_s <= slo[0] and r.e2e_p95_s <= slo[1]
        cost = r.gpu_hours * args.gpu_cost
        saving = 1 - r.gpu_hours / base.gpu_hours
        rows[r.name] = dict(gpu_hours=round(r.gpu_hours, 1), saving=round(saving, 3), usd_day=round(cost, 2),
                            usd_per_1k=round(cost / r.requests * 1000, 4), ttft_p95_s=round(r.ttft_p95_s, 3),
                            e2e_p95_s=round(r.e2e_p95_s, 3), slo_met=met, violation_minutes=r.violation_minutes)
        print(f"{r.name:<10} {r.gpu_hours:7.1f} {saving:7.1%} {cost:8.2f} {cost / r.requests * 1000:9.4f} "
              f"{r.ttft_p95_s:8.2f}s {r.e2e_p95_s:7.2f}s {'yes' if met else 'NO':>4} {r.violation_minutes:8d} "
              f"{r.late_fraction:6.2%}")
    plot(results, trace, slo[1], Path(args.plot))
    print(f"\nplot: {args.plot}   ({time.monotonic() - started:.1f}s)")
    ours_row, pre_row = rows["ours"], rows["ours+pre"]
    print(json.dumps({
        "policy": "ours (queue depth + p95, leanserve.router.autoscaler)",
        "gpu_hours_saving_vs_static": ours_row["saving"],
        "p95_slo_met": ours_row["slo_met"] and base.ttft_p95_s <= slo[0] and base.e2e_p95_s <= slo[1],
        "gpu_hours": ours_row["gpu_hours"], "static_gpu_hours": rows["static"]["gpu_hours"],
        "static_replicas": n_static, "e2e_p95_s": ours_row["e2e_p95_s"], "ttft_p95_s": ours_row["ttft_p95_s"],
        "prescale_gpu_hours_saving_vs_static": pre_row["saving"], "prescale_p95_slo_met": pre_row["slo_met"],
        "prescale_violation_minutes": pre_row["violation_minutes"],
        "reactive_gpu_hours_saving_vs_static": rows["reactive"]["saving"],
        "reactive_p95_slo_met": rows["reactive"]["slo_met"],
        "service_curve": curve.source, "seed": args.seed, "cold_start_s": args.cold_start,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
