"""`leanserve router ...`: argparse wiring. The main CLI calls `add_router_subcommand`."""

from __future__ import annotations

import argparse
import logging

from leanserve.router.autoscaler import AutoscalerConfig
from leanserve.router.policies import POLICIES
from leanserve.router.proxy import RouterConfig


def add_router_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--replica", action="append", default=[], metavar="URL",
                   help="replica base URL, e.g. http://127.0.0.1:8000 (repeat for each)")
    p.add_argument("--canary", action="append", default=[], metavar="URL", help="canary replica URL")
    p.add_argument("--canary-weight", type=float, default=0.05,
                   help="fraction of requests sent to the canaries (default 0.05)")
    p.add_argument("--discover", metavar="HOST:PORT",
                   help="also follow the replicas a DNS name resolves to (Kubernetes headless Service)")
    p.add_argument("--policy", choices=POLICIES, default="least-loaded")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between replica polls")
    p.add_argument("--eject-after", type=int, default=3, help="failed health checks before ejection")
    p.add_argument("--readmit-after", type=int, default=2, help="passing checks before readmission")
    p.add_argument("--max-attempts", type=int, default=3, help="replicas tried per request")
    p.add_argument("--replica-max-concurrency", type=int, default=32,
                   help="concurrent requests one replica serves within SLO (pack policy, autoscaler)")
    p.add_argument("--latency-target", type=float, default=0.0,
                   help="pack policy: p95 seconds above which a replica takes no more (0 = off)")
    p.add_argument("--prefix-chars", type=int, default=256, help="prefix-affinity key length")
    p.add_argument("--min-replicas", type=int, default=1, help="autoscaler warm pool")
    p.add_argument("--max-replicas", type=int, default=8, help="autoscaler ceiling")
    p.add_argument("--ttft-target", type=float, default=1.0, help="autoscaler p95 TTFT target (s)")
    p.add_argument("--e2e-target", type=float, default=10.0, help="autoscaler p95 e2e target (s)")
    p.add_argument("--log-level", default="info")


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


def run_router(args: argparse.Namespace) -> int:
    import uvicorn

    from leanserve.router.app import create_app

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    app = create_app(config_from_args(args))
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level.lower())
    return 0
