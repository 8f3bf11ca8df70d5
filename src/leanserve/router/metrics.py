"""The router's own Prometheus metrics, in a registry per router so tests can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "leanserve_router_requests", "Upstream attempts by replica and HTTP status "
            "('error' for a transport failure).", ["replica", "status"], registry=r,
        )
        self.retries = Counter(
            "leanserve_router_retries", "Requests re-sent to another replica after failing before "
            "any byte reached the client.", ["replica", "reason"], registry=r,
        )
        self.ejections = Counter(
            "leanserve_router_ejections", "Replicas taken out of rotation.", ["replica"], registry=r
        )
        self.readmissions = Counter(
            "leanserve_router_readmissions", "Replicas put back in rotation.", ["replica"], registry=r
        )
        self.unroutable = Counter(
            "leanserve_router_unroutable", "Requests answered 503 because no replica was healthy.",
            registry=r,
        )
        self.healthy = Gauge("leanserve_router_healthy_replicas", "Replicas in rotation.", registry=r)
        self.in_flight = Gauge(
            "leanserve_router_in_flight", "Requests outstanding per replica.", ["replica"], registry=r
        )
        self.desired = Gauge(
            "leanserve_desired_replicas", "Replica count the autoscaler asks for.", registry=r
        )
        self.ttfb = Histogram(
            "leanserve_router_time_to_first_byte_seconds", "Streaming time to first chunk per replica.",
            ["replica"], registry=r,
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
