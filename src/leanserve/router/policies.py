"""Routing policies: pick one replica for a request from the router's view of the fleet.

Every policy is `choose(replicas, key) -> ReplicaState | None` over plain `ReplicaState`s, so it
is testable without HTTP. `key` is the prompt prefix (used by prefix-affinity only). Unhealthy
replicas are never chosen; None means there is nothing to route to.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from leanserve.router.replica import ReplicaState

__all__ = [
    "LeastLoaded",
    "Pack",
    "Policy",
    "PrefixAffinity",
    "ReplicaState",
    "RoundRobin",
    "choose_pool",
    "load_score",
    "make_policy",
]

# A full KV cache means the next request waits for blocks to free up even with few running, so
# KV pressure counts like a few extra queued requests.
KV_WEIGHT = 4.0
# A waiting request is pure delay, a running one only shares the batch: count waiting twice.
WAITING_WEIGHT = 2.0


def load_score(r: ReplicaState) -> float:
    """Lower is better. Divided by weight so a replica with twice the capacity takes twice the load."""
    return (r.load + (WAITING_WEIGHT - 1.0) * r.waiting + KV_WEIGHT * r.kv_usage) / max(r.weight, 1e-9)


def _healthy(replicas: Sequence[ReplicaState]) -> list[ReplicaState]:
    return [r for r in replicas if r.healthy]


class Policy(Protocol):
    name: str

    def choose(self, replicas: Sequence[ReplicaState], key: str = "") -> ReplicaState | None: ...


class RoundRobin:
    name = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, replicas: Sequence[ReplicaState], key: str = "") -> ReplicaState | None:
        healthy = _healthy(replicas)
        return healthy[next(self._counter) % len(healthy)] if healthy else None


class LeastLoaded:
    """Lowest `load_score`. The score includes the router's in-flight count, which the proxy bumps
    on every request it sends, so a burst between two polls spreads out instead of piling onto
    whichever replica looked idle at the last poll."""

    name = "least-loaded"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def choose(self, replicas: Sequence[ReplicaState], key: str = "") -> ReplicaState | None:
        healthy = _healthy(replicas)
        if not healthy:
            return None
        # Rotate the scan start so ties (e.g. an idle fleet) are shared rather than all going first.
        start = next(self._counter) % len(healthy)
        rotated = healthy[start:] + healthy[:start]
        return min(rotated, key=load_score)


def _rendezvous_weight(key: str, r: ReplicaState) -> float:
    # blake2b, not hash(): the mapping must agree across router processes and restarts.
    digest = hashlib.blake2b(f"{key}\x00{r.url}".encode(), digest_size=8).digest()
    u = (int.from_bytes(digest, "big") + 1) / (2**64 + 2)  # uniform in (0, 1)
    return -max(r.weight, 1e-9) / math.log(u)  # weighted rendezvous (HRW) score


@dataclass
class PrefixAffinity:
    """Same prompt prefix -> same replica, so its prefix cache is reused.

    Rendezvous hashing: when a replica leaves, only its keys move. If the preferred replica's load
    score exceeds the least-loaded one's by more than `max_imbalance`, cache reuse is not worth the
    queueing and the request goes to the least-loaded replica instead.
    """

    prefix_chars: int = 256
    max_imbalance: float = 8.0
    name: str = "prefix-affinity"

    def __post_init__(self) -> None:
        self._fallback = LeastLoaded()

    def choose(self, replicas: Sequence[ReplicaState], key: str = "") -> ReplicaState | None:
        healthy = _healthy(replicas)
        if not healthy:
            return None
        prefix = key[: self.prefix_chars]
        preferred = max(healthy, key=lambda r: _rendezvous_weight(prefix, r))
        least = self._fallback.choose(healthy)
        assert least is not None
        if load_score(preferred) - load_score(least) > self.max_imbalance:
            return least
        return preferred


@dataclass
class Pack:
    """Bin-packing: fill the busiest replica that still has headroom so the others drain and can be
    scaled in. Headroom means load below `max_concurrency` and recent p95 below `latency_target_s`
    (0 disables the latency check). With no headroom anywhere, fall back to least-loaded."""

    max_concurrency: int = 32
    latency_target_s: float = 0.0
    name: str = "pack"

    def __post_init__(self) -> None:
        self._fallback = LeastLoaded()

    def _has_headroom(self, r: ReplicaState) -> bool:
        if r.load + 1 > self.max_concurrency * r.weight:
            return False
        return not (self.latency_target_s > 0 and r.p95_latency_s > self.latency_target_s)

    def choose(self, replicas: Sequence[ReplicaState], key: str = "") -> ReplicaState | None:
        healthy = _healthy(replicas)
        open_ = [r for r in healthy if self._has_headroom(r)]
        if not open_:
            return self._fallback.choose(healthy)
        # max() keeps the first of equals: a stable order, so one replica fills up before the next.
        return max(open_, key=lambda r: r.load / max(r.weight, 1e-9))


POLICIES = ("round-robin", "least-loaded", "prefix-affinity", "pack")


def make_policy(
    name: str, *, max_concurrency: int = 32, latency_target_s: float = 0.0, prefix_chars: int = 256
) -> Policy:
    if name == "round-robin":
        return RoundRobin()
    if name == "least-loaded":
        return LeastLoaded()
    if name == "prefix-affinity":
        return PrefixAffinity(prefix_chars=prefix_chars)
    if name == "pack":
        return Pack(max_concurrency=max_concurrency, latency_target_s=latency_target_s)
    raise ValueError(f"unknown policy {name!r}; choose from {', '.join(POLICIES)}")


def choose_pool(
    replicas: Sequence[ReplicaState], canary_weight: float, rng: random.Random
) -> list[ReplicaState]:
    """Weighted canary split: the canary pool with probability `canary_weight`, else the primary
    pool. An empty or fully unhealthy pool falls through to the other so a canary outage (or a
    primary outage) never turns into errors."""
    canary = [r for r in replicas if r.canary and r.healthy]
    primary = [r for r in replicas if not r.canary and r.healthy]
    want_canary = canary_weight > 0 and rng.random() < canary_weight
    if want_canary:
        return canary or primary
    return primary or canary
