"""`leanserve router ...`: argparse wiring. The main CLI calls `add_router_subcommand`."""

from __future__ import annotations

import argparse
import logging
import sys
from urllib.parse import urlsplit

from leanserve.cli_types import non_negative_float, port, positive_float, positive_int, unit_interval
from leanserve.router.autoscaler import AutoscalerConfig
from leanserve.router.discovery import parse_target
from leanserve.router.policies import POLICIES
from leanserve.router.proxy import RouterConfig

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
# Their INFO lines are one per health and metrics poll: ~4 a second per replica at the defaults.
CHATTY_LOGGERS = ("httpx", "httpcore")


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    # Ranges are checked by the argparse types (cli_types): a bad number is a usage error, exit 2.
    p.add_argument("--replica", action="append", default=[], metavar="URL",
                   help="replica base URL, e.g. http://127.0.0.1:8000 (repeat for each)")
    p.add_argument("--canary", action="append", default=[], metavar="URL", help="canary replica URL")
    p.add_argument("--canary-weight", type=unit_interval, default=0.05,
                   help="fraction of requests sent to the canaries, in [0, 1] (default 0.05)")
    p.add_argument("--discover", metavar="HOST:PORT",
                   help="also follow the replicas a DNS name resolves to (Kubernetes headless Service)")
    p.add_argument("--policy", choices=POLICIES, default="least-loaded")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=port, default=8080)
    p.add_argument("--poll-interval", type=positive_float, default=0.5, help="seconds between replica polls")
    p.add_argument("--eject-after", type=positive_int, default=3, help="failed health checks before ejection")
    p.add_argument("--readmit-after", type=positive_int, default=2, help="passing checks before readmission")
    p.add_argument("--max-attempts", type=positive_int, default=3, help="replicas tried per request")
    p.add_argument("--replica-max-concurrency", type=positive_int, default=32,
                   help="concurrent requests one replica serves within SLO (pack policy, autoscaler)")
    p.add_argument("--latency-target", type=non_negative_float, default=0.0,
                   help="pack policy: p95 seconds above which a replica takes no more (0 = off)")
    p.add_argument("--prefix-chars", type=positive_int, default=256, help="prefix-affinity key length")
    p.add_argument("--min-replicas", type=positive_int, default=1, help="autoscaler warm pool")
    p.add_argument("--max-replicas", type=positive_int, default=8, help="autoscaler ceiling")
    p.add_argument("--ttft-target", type=positive_float, default=1.0, help="autoscaler p95 TTFT target (s)")
    p.add_argument("--e2e-target", type=positive_float, default=10.0, help="autoscaler p95 e2e target (s)")
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info", metavar="LEVEL",
                   help=f"one of {', '.join(LOG_LEVELS)}")


def add_router_subcommand(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser("router", help="OpenAI-compatible load-balancing proxy over replicas")
    add_router_arguments(p)
    p.set_defaults(func=run_router)
    return p


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    return RouterConfig(
        replicas=args.replica, canaries=args.canary,
        canary_weight=args.canary_weight if args.canary else 0.0,
        policy=args.policy, poll_interval_s=args.poll_interval, eject_after=args.eject_after,
        readmit_after=args.readmit_after, max_attempts=args.max_attempts,
        replica_max_concurrency=args.replica_max_concurrency, latency_target_s=args.latency_target,
        prefix_chars=args.prefix_chars, discover=args.discover,
        autoscaler=AutoscalerConfig(
            min_replicas=args.min_replicas, max_replicas=args.max_replicas,
            replica_concurrency=args.replica_max_concurrency,
            ttft_p95_target_s=args.ttft_target, e2e_p95_target_s=args.e2e_target,
        ),
    )


# ---- validation: every mistake is one line and exit status 2 before anything starts ------------

def _check_targets(args: argparse.Namespace) -> str | None:
    if not (args.replica or args.canary or args.discover):
        return "nowhere to send requests: give --replica URL (repeatable) or --discover HOST:PORT"
    return None


def _url_problem(url: str) -> str | None:
    # Caught here, a URL without a scheme would otherwise wait for a health check that never passes.
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port that is not a number in 0-65535 raises only when read
    except ValueError as exc:
        return str(exc)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "want http://HOST:PORT or https://HOST:PORT"
    return None


def _check_urls(args: argparse.Namespace) -> str | None:
    for flag, urls in (("--replica", args.replica), ("--canary", args.canary)):
        for url in urls:
            if problem := _url_problem(url):
                return f"{flag} {url!r}: {problem}"
    return None


def _check_discover(args: argparse.Namespace) -> str | None:
    if args.discover is None:
        return None
    try:
        parse_target(args.discover)
    except ValueError as exc:
        return str(exc)
    return None


def _check_replica_bounds(args: argparse.Namespace) -> str | None:
    if args.max_replicas < args.min_replicas:
        return f"--max-replicas must be >= --min-replicas, got {args.max_replicas} < {args.min_replicas}"
    return None


def argument_error(args: argparse.Namespace) -> str | None:
    """The first thing wrong with the router's arguments, or None."""
    checks = (_check_targets, _check_urls, _check_discover, _check_replica_bounds)
    return next((problem for check in checks if (problem := check(args))), None)


def _fail(message: str) -> int:
    print(f"leanserve router: error: {message}", file=sys.stderr)
    return 2


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    chatty = logging.DEBUG if level.lower() == "debug" else logging.WARNING
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(chatty)


def run_router(args: argparse.Namespace) -> int:
    if problem := argument_error(args):
        return _fail(problem)
    import uvicorn

    from leanserve.router.app import create_app

    try:
        app = create_app(config_from_args(args))
    except ValueError as exc:  # a combination the checks above do not know about yet
        return _fail(str(exc))
    configure_logging(args.log_level)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
