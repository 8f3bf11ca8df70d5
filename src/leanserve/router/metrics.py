"""The router's own Prometheus metrics, in a registry per router so tests can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase

BY_REPLICA = ("replica",)
BY_REPLICA_STATUS = ("replica", "status")
BY_REPLICA_REASON = ("replica", "reason")


class RouterMetrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "leanserve_router_requests", "Upstream attempts by replica and HTTP status "
            "('error' for a transport failure, 'cancelled' when the client left first).",
            BY_REPLICA_STATUS, registry=r,
        )
        self.stream_failures = Counter(
            "leanserve_router_stream_failures", "Streams whose replica failed after the 200 went out "
            "('error': the connection broke; 'truncated': it closed without [DONE]); each client got "
            "an error event.", BY_REPLICA_REASON, registry=r,
        )
        self.retries = Counter(
            "leanserve_router_retries", "Requests re-sent to another replica after failing before "
            "any byte reached the client.", BY_REPLICA_REASON, registry=r,
        )
        self.ejections = Counter(
            "leanserve_router_ejections", "Replicas taken out of rotation.", BY_REPLICA, registry=r
        )
        self.readmissions = Counter(
            "leanserve_router_readmissions", "Replicas put back in rotation.", BY_REPLICA, registry=r
        )
        self.unroutable = Counter(
            "leanserve_router_unroutable", "Requests answered 503 because no replica was healthy.",
            registry=r,
        )
        self.healthy = Gauge("leanserve_router_healthy_replicas", "Replicas in rotation.", registry=r)
        self.in_flight = Gauge(
            "leanserve_router_in_flight", "Requests outstanding per replica.", BY_REPLICA, registry=r
        )
        self.desired = Gauge(
            "leanserve_desired_replicas", "Replica count the autoscaler asks for.", registry=r
        )
        self.ttfb = Histogram(
            "leanserve_router_time_to_first_byte_seconds", "Streaming time to first chunk per replica.",
            BY_REPLICA, registry=r,
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )
        # Every family with a replica label, with its label names (in declaration order, as remove() wants).
        self._by_replica: tuple[tuple[MetricWrapperBase, tuple[str, ...]], ...] = (
            (self.requests, BY_REPLICA_STATUS), (self.stream_failures, BY_REPLICA_REASON),
            (self.retries, BY_REPLICA_REASON), (self.ejections, BY_REPLICA),
            (self.readmissions, BY_REPLICA), (self.in_flight, BY_REPLICA), (self.ttfb, BY_REPLICA),
        )

    def forget(self, replica: str) -> None:
        """Drop every series labelled with `replica`, so pod churn under discovery does not grow the
        page (and the series count in Prometheus) without bound."""
        for metric, names in self._by_replica:
            at = names.index("replica")
            for values in _label_values(metric, names):
                if values[at] == replica:
                    metric.remove(*values)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def _label_values(metric: MetricWrapperBase, names: tuple[str, ...]) -> set[tuple[str, ...]]:
    """The label values a metric holds series for, read through the public collect() (the
    `remove_by_labels` shortcut is newer than the prometheus_client versions we accept)."""
    return {tuple(s.labels[n] for n in names) for family in metric.collect() for s in family.samples}
