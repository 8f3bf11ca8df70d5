"""Ablation of the batching levers on the embedded model, same prompts, one machine, one run.

Configurations (each a fresh ``leanserve serve`` started by ``serving.py``):

- ``none``      no batching: ``max_num_seqs=1``
- ``static``    static batching: a batch starts only when the previous one has finished
- ``fixed20``   continuous batching with a fixed 20 ms batching window
- ``adaptive``  continuous batching with the adaptive window (the default)
- ``nowait``    continuous batching with no window at all (the TTFT reference at low load)
- prefix caching: ``adaptive`` with and without the prefix cache on prompts sharing a 512-token prefix

Each runs a Poisson sweep of request rates plus a closed-loop saturation point; the table and a plot of
throughput against p95 latency go to ``benchmarks/results/``. The last line is one JSON object with
``continuous_vs_none`` and ``continuous_vs_static`` (output tok/s ratios at saturation),
``ttft_p50_adaptive_ms`` / ``ttft_p50_nowait_ms`` / ``ttft_p50_fixed20_ms`` (at 0.5 req/s) and
``prefix_cache_ttft_speedup``.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import serving

RESULTS = Path(__file__).resolve().parent / "results"

CONFIGS: dict[str, list[str]] = {
    "none": ["engine.max_num_seqs=1", "scheduler.max_batch_wait_ms=0"],
    "static": ["scheduler.batching=static", "scheduler.max_batch_wait_ms=0"],
    "fixed20": ["scheduler.max_batch_wait_ms=20", "scheduler.adaptive_batch_wait=false"],
    "adaptive": ["scheduler.max_batch_wait_ms=20", "scheduler.adaptive_batch_wait=true"],
    "nowait": ["scheduler.max_batch_wait_ms=0"],
}


def load_point(url: str, args: argparse.Namespace, **overrides: object) -> dict:
    argv = ["--url", url, "--input-len", str(args.input_len), "--output-len", str(args.output_len),
            "--seed", str(args.seed), "--usd-per-hour", str(args.usd_per_hour)]
    point = serving.parse_args(argv)
    for key, value in overrides.items():
        setattr(point, key, value)
    if point.rate:
        point.concurrency = None
    summary = serving.run(point)
    serving.print_table(summary)
    return summary


def with_server(settings: list[str], args: argparse.Namespace, body) -> list[dict]:
    server = serving.ServerProcess(args.model, None, dict(s.split("=", 1) for s in settings), serving.free_port())
    try:
        server.wait_ready()
        return body(server.url)
    finally:
        server.stop()


def sweep(name: str, args: argparse.Namespace) -> list[dict]:
    # Prefix caching off, so the batching configs are compared on batching alone.
    settings = CONFIGS[name] + ["engine.enable_prefix_caching=false"]
    rates = args.rates if name in ("static", "fixed20", "adaptive") else [0.5]
    if name == "nowait":
        rates = [0.5]

    def body(url: str) -> list[dict]:
        points = []
        for rate in rates:
            n = max(4, int(rate * args.seconds_per_rate))
            points.append({"config": name, **load_point(url, args, rate=rate, num_requests=n)})
        if name != "nowait":
            n = args.saturation_requests if name != "none" else max(4, args.saturation_requests // 4)
            points.append(
                {"config": name, **load_point(url, args, concurrency=args.concurrency, num_requests=n)}
            )
        return points

    print(f"== {name}: {' '.join(settings)}")
    return with_server(settings, args, body)


def prefix_points(args: argparse.Namespace) -> list[dict]:
    points = []
    for cached in (False, True):
        settings = CONFIGS["adaptive"] + [f"engine.enable_prefix_caching={str(cached).lower()}"]

        def body(url: str, cached: bool = cached) -> list[dict]:
            summary = load_point(
                url, args, concurrency=2, num_requests=args.prefix_requests,
                input_len=args.prefix_len + 64, shared_prefix_len=args.prefix_len,
            )
            return [{"config": "prefix-cache" if cached else "no-prefix-cache", **summary}]

        print(f"== prefix caching {'on' if cached else 'off'}")
        points += with_server(settings, args, body)
    return points


def plot(points: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name in CONFIGS:
        mine = [p for p in points if p["config"] == name and p["e2e_p95_ms"] is not None]
        if not mine:
            continue
        mine.sort(key=lambda p: p["output_tok_s"])
        ax.plot([p["output_tok_s"] for p in mine], [p["e2e_p95_ms"] / 1000 for p in mine], "o-", label=name)
    ax.set_xlabel("output tokens/s")
    ax.set_ylabel("p95 end-to-end latency (s)")
    ax.set_yscale("log")
    ax.set_title("Batching ablation (embedded model, 2 CPU cores)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--quick", action="store_true", help="reduced version, under 5 minutes")
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--usd-per-hour", type=float, default=2.0)
    args = p.parse_args()
    if args.quick:
        args.rates, args.seconds_per_rate, args.saturation_requests = [0.5], 16, 32
        args.output_len = min(args.output_len, 32)
        args.prefix_len, args.prefix_requests = 512, 6
    else:
        args.rates, args.seconds_per_rate, args.saturation_requests = [0.5, 1.0, 2.0, 4.0], 40, 64
        args.prefix_len, args.prefix_requests = 512, 16

    points: list[dict] = []
    for name in ("none", "static", "fixed20", "adaptive", "nowait"):
        points += sweep(name, args)
    points += prefix_points(args)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ablation.json").write_text(json.dumps(points, indent=1))
    plot(points, RESULTS / "ablation.png")

    def at(config: str, **match: object) -> dict:
        return next(p for p in points if p["config"] == config and all(p[k] == v for k, v in match.items()))

    sat = {name: at(name, concurrency=args.concurrency) for name in ("none", "static", "adaptive")}
    low = {name: at(name, rate=0.5) for name in ("adaptive", "nowait", "fixed20")}
    prefix_off, prefix_on = at("no-prefix-cache"), at("prefix-cache")
    print(f"\n{'config':<16}{'mode':<18}{'out tok/s':>10}{'TTFT p50':>10}{'TTFT p95':>10}{'e2e p95':>10}")
    for point in points:
        print(f"{point['config']:<16}{point['mode']:<18}{point['output_tok_s']:>10}"
              f"{point['ttft_p50_ms']:>10}{point['ttft_p95_ms']:>10}{point['e2e_p95_ms']:>10}")
    result = {
        "continuous_vs_none": round(sat["adaptive"]["output_tok_s"] / sat["none"]["output_tok_s"], 3),
        "continuous_vs_static": round(sat["adaptive"]["output_tok_s"] / sat["static"]["output_tok_s"], 3),
        "ttft_p50_adaptive_ms": low["adaptive"]["ttft_p50_ms"],
        "ttft_p50_nowait_ms": low["nowait"]["ttft_p50_ms"],
        "ttft_p50_fixed20_ms": low["fixed20"]["ttft_p50_ms"],
        "prefix_cache_ttft_speedup": round(prefix_off["ttft_p50_ms"] / prefix_on["ttft_p50_ms"], 3),
        "saturation_tok_s": {k: v["output_tok_s"] for k, v in sat.items()},
        "concurrency": args.concurrency,
        "quick": args.quick,
        "load_avg": [round(x, 2) for x in os.getloadavg()],
        "plot": str((RESULTS / "ablation.png").relative_to(RESULTS.parent.parent)),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
