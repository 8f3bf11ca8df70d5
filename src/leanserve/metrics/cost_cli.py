"""`leanserve cost`: what serving a given traffic costs, from a benchmark result or from flags.

    python benchmarks/serving.py ... | tail -1 > bench.json
    leanserve cost --bench bench.json --usd-per-gpu-hour 2.5 --requests-per-day 2e6

prints the GPUs needed, $/day, $/1K requests and $/1M output tokens, then the savings table of the
four levers (continuous batching, paged KV + prefix cache, INT4 weights, smart scheduling) against
a baseline. Every number that is not measured is an assumption, printed as one, with the flag that
replaces it.

Every number given (flags and the benchmark's fields) must be finite and positive: a price, a
throughput or a traffic of 0, below 0, NaN or infinity has no meaningful cost, so it is a usage
error (exit status 2) rather than a report of NaN or negative dollars. Output tokens per request
come from, first to last: --output-tokens-per-request; --output-tokens-per-day / --requests-per-day
when both are given (so giving all three is an error); the benchmark's output_tok_s / req_s (or
--throughput / --req-s); else 200, printed as an assumption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path
from typing import Any, TextIO

from leanserve.cli_types import fraction, positive_float, positive_int
from leanserve.metrics import cost

DEFAULT_REQUESTS_PER_DAY = 1_000_000.0  # assumption when no traffic is given
DEFAULT_TOKENS_PER_REQUEST = 200.0  # assumption when neither the benchmark nor a flag says

_LEVER_FLAGS = ("batching_gain", "kv_cache_gain", "int4_gain", "scheduling_gain")


def add_cost_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    defaults = cost.default_levers()
    p = subparsers.add_parser(
        "cost",
        help="GPUs, $/day, $/1K requests and $/1M tokens for a traffic, and the savings per lever",
        description=__doc__.split("\n\n")[0],
    )
    src = p.add_argument_group("capacity (one replica)")
    src.add_argument("--bench", metavar="FILE",
                     help="serving benchmark output ('-' = stdin); its last JSON line is read "
                          "(output_tok_s, req_s)")
    src.add_argument("--throughput", type=positive_float, metavar="TOK_S", help="output tokens/s of one replica")
    src.add_argument("--req-s", type=positive_float, help="requests/s of one replica at that throughput")
    src.add_argument("--gpus-per-replica", type=positive_int, default=None,
                     help="GPUs one replica uses (default: the benchmark's num_gpus, else 1)")
    price = p.add_argument_group("price and traffic")
    price.add_argument("--usd-per-gpu-hour", type=positive_float, default=None,
                       help=f"price of one GPU for an hour (default ${cost.DEFAULT_USD_PER_GPU_HOUR:.2f}, "
                            "an assumption; on CPU give the host's hourly price)")
    price.add_argument("--requests-per-day", type=positive_float,
                       help=f"traffic (default {DEFAULT_REQUESTS_PER_DAY:,.0f}, an assumption)")
    price.add_argument("--output-tokens-per-day", type=positive_float,
                       help="traffic in generated tokens, instead of or with --requests-per-day (both: "
                            "their ratio is the output tokens per request)")
    price.add_argument("--output-tokens-per-request", type=positive_float,
                       help="default: --output-tokens-per-day / --requests-per-day when both are given, "
                            f"else output_tok_s / req_s, else {DEFAULT_TOKENS_PER_REQUEST:.0f}")
    price.add_argument("--target-utilization", type=fraction, default=cost.DEFAULT_TARGET_UTILIZATION,
                       help="plan replicas to run this busy on average (default 0.7: headroom for peaks)")
    base = p.add_argument_group("baseline for the savings table")
    base.add_argument("--baseline-bench", metavar="FILE", help="benchmark output of the baseline server")
    base.add_argument("--baseline-throughput", type=positive_float, metavar="TOK_S",
                      help="baseline output tokens/s per replica (default: measured / all lever gains)")
    for flag, lever in zip(_LEVER_FLAGS, defaults, strict=True):
        base.add_argument(f"--{flag.replace('_', '-')}", type=positive_float, default=lever.gain,
                          help=f"assumed throughput gain of {lever.name} (default x{lever.gain:g})")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    p.set_defaults(func=run_cost)
    return p


def read_bench(path: str, stdin: TextIO | None = None) -> dict[str, Any]:
    """The last line of a benchmark's output that is a JSON object."""
    text = (stdin or sys.stdin).read() if path == "-" else Path(path).read_text()
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    raise ValueError(f"{path}: no JSON object line found (expected the benchmark's last line)")


def _throughput(bench: dict[str, Any] | None, tok_s: float | None, req_s: float | None,
                gpus: int | None, bench_name: str = "benchmark") -> cost.Throughput | None:
    """A flag wins over the benchmark's field; the flags were checked by argparse, fields are here."""
    if bench is not None:
        tok_s = tok_s if tok_s is not None else _bench_number(bench, "output_tok_s", bench_name)
        req_s = req_s if req_s is not None else _bench_number(bench, "req_s", bench_name)
        gpus = gpus if gpus is not None else _bench_gpus(bench, bench_name)
    if tok_s is None:
        return None
    return cost.Throughput(tok_s, req_s, gpus if gpus is not None else 1)


def _bench_number(bench: dict[str, Any], key: str, name: str) -> float | None:
    """A benchmark field, if present: finite and positive (json.loads takes NaN and Infinity)."""
    value = bench.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: {key} must be a finite number greater than 0, got {value!r}")
    return float(value)


def _bench_gpus(bench: dict[str, Any], name: str) -> int | None:
    value = bench.get("num_gpus")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: num_gpus must be a whole number greater than 0, got {value!r}")
    return value


def _tokens_per_request(args: argparse.Namespace, measured: cost.Throughput) -> tuple[float, str | None]:
    """Output tokens per request and, when it is a guess, the assumption to print (rules: module doc)."""
    traffic_ratio_given = args.requests_per_day is not None and args.output_tokens_per_day is not None
    if args.output_tokens_per_request is not None:
        if traffic_ratio_given:
            raise ValueError("give at most two of --requests-per-day, --output-tokens-per-day and "
                             "--output-tokens-per-request: the two per-day figures fix the third")
        return args.output_tokens_per_request, None
    if traffic_ratio_given:
        return args.output_tokens_per_day / args.requests_per_day, None
    if measured.output_tokens_per_request is not None:
        return measured.output_tokens_per_request, None
    return DEFAULT_TOKENS_PER_REQUEST, (f"{DEFAULT_TOKENS_PER_REQUEST:.0f} output tokens per request "
                                        "(--output-tokens-per-request)")


def build_report(args: argparse.Namespace, stdin: TextIO | None = None) -> dict[str, Any]:
    """Everything the command prints, as data (the JSON output and the tests use it)."""
    assumptions: list[str] = []
    bench = read_bench(args.bench, stdin) if args.bench else None
    measured = _throughput(bench, args.throughput, args.req_s, args.gpus_per_replica, str(args.bench))
    if measured is None:
        raise ValueError("give --bench FILE or --throughput TOK_S")
    if args.bench is None or args.throughput is not None:
        source = "flags"
    else:
        source = f"benchmark {args.bench}"

    per_request, assumed = _tokens_per_request(args, measured)
    if assumed is not None:
        assumptions.append(assumed)
    if measured.req_s is None:
        measured = dataclasses.replace(measured, req_s=measured.output_tok_s / per_request)
    requests_per_day = args.requests_per_day
    if requests_per_day is None and args.output_tokens_per_day is None:
        requests_per_day = DEFAULT_REQUESTS_PER_DAY
        assumptions.append(f"{requests_per_day:,.0f} requests/day (--requests-per-day)")
    price = args.usd_per_gpu_hour
    if price is None:
        price = cost.DEFAULT_USD_PER_GPU_HOUR
        assumptions.append(f"${price:.2f} per GPU-hour (--usd-per-gpu-hour)")
    assumptions.append(f"replicas planned at {args.target_utilization:.0%} average utilization "
                       "(--target-utilization)")
    traffic = cost.Traffic(requests_per_day, args.output_tokens_per_day)
    # Requests and tokens are tied by the tokens-per-request ratio used for the plan.
    reqs, toks = traffic.resolve(per_request)
    traffic = cost.Traffic(reqs, toks)
    plan = cost.plan_fleet(measured, traffic, price, args.target_utilization)

    levers = cost.default_levers()
    for flag, lever in zip(_LEVER_FLAGS, levers, strict=True):
        lever.gain = getattr(args, flag)
    baseline_bench = read_bench(args.baseline_bench) if args.baseline_bench else None
    baseline = _throughput(baseline_bench, args.baseline_throughput, None, measured.gpus_per_replica,
                           str(args.baseline_bench))
    derived = baseline is None
    if derived:
        baseline = measured.scaled(1.0 / cost.combined_gain(levers))
    elif baseline.req_s is None:
        baseline = dataclasses.replace(baseline, req_s=baseline.output_tok_s / per_request)
    table = cost.savings_table(baseline, traffic, price, levers, args.target_utilization,
                               measured=None if derived else measured, baseline_assumed=derived)
    if derived:
        table.notes.append("baseline derived as measured throughput / product of the assumed gains "
                           "(give --baseline-bench or --baseline-throughput to measure it)")
    return {
        "source": source,
        "throughput": dataclasses.asdict(measured),
        "usd_per_gpu_hour": price,
        "plan": dataclasses.asdict(plan),
        "levers": [dataclasses.asdict(lever) for lever in levers],
        "savings": [dataclasses.asdict(row) for row in table.rows],
        "notes": table.notes,
        "assumptions": assumptions,
    }


def format_report(r: dict[str, Any]) -> str:
    t, p = r["throughput"], r["plan"]
    lines = [
        f"Capacity ({r['source']}): {t['output_tok_s']:,.1f} output tok/s, {t['req_s']:,.2f} req/s "
        f"per replica ({t['gpus_per_replica']} GPU)",
        f"Traffic: {p['requests_per_day']:,.0f} requests/day, {p['output_tokens_per_day']:,.0f} output "
        "tokens/day",
        f"Fleet: {p['replicas']} replica(s) = {p['gpus']} GPU(s), {p['utilization']:.0%} busy on average",
        f"Cost: ${p['usd_per_day']:,.2f}/day | ${p['usd_per_1k_requests']:,.4f} per 1K requests | "
        f"${p['usd_per_1m_tokens']:,.2f} per 1M output tokens  (at ${r['usd_per_gpu_hour']:.2f}/GPU-hour)",
        "",
        "Savings from the four levers (cumulative, against the baseline):",
        f"  {'configuration':<34}{'tok/s/GPU':>12}{'GPUs':>7}{'$/day':>13}{'$/1M tok':>11}{'saving':>9}",
    ]
    for row in r["savings"]:
        mark = "" if not row["assumed"] else " *"
        lines.append(
            f"  {row['label'] + mark:<34}{row['tok_s_per_gpu']:>12,.1f}{row['gpus']:>7}"
            f"{row['usd_per_day']:>13,.2f}{row['usd_per_1m_tokens']:>11,.2f}{row['saving_vs_baseline']:>9.0%}"
        )
    lines.append("  * = from assumed gains, not measured")
    lines.append("")
    lines.append("Lever gains assumed (throughput per GPU):")
    for lever in r["levers"]:
        lines.append(f"  x{lever['gain']:<5g} {lever['name']}: {lever['assumption']}")
    for note in r["notes"]:
        lines.append(f"Note: {note}")
    if r["assumptions"]:
        lines.append("Assumptions (override with the flag in brackets): " + "; ".join(r["assumptions"]))
    return "\n".join(lines)


def run_cost(args: argparse.Namespace) -> int:
    try:
        report = build_report(args)
        # allow_nan=False: NaN and Infinity are not JSON; a report holding one is a bug to surface.
        text = json.dumps(report, allow_nan=False) if args.json else format_report(report)
    except (ValueError, OSError) as exc:
        print(f"leanserve cost: error: {exc}", file=sys.stderr)
        return 2
    print(text)
    return 0
