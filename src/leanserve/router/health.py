"""Active health checks: eject a replica after repeated failures, readmit it after it recovers."""

from __future__ import annotations

import httpx

from leanserve.router.replica import ReplicaState, parse_load_metrics


def record_check(r: ReplicaState, ok: bool, eject_after: int, readmit_after: int) -> str | None:
    """Update the streak counters; returns "ejected", "admitted" or "readmitted" when the state flips.

    Requiring a streak both ways keeps one dropped probe from ejecting a busy replica and one lucky
    probe from readmitting a crash-looping one.
    """
    if ok:
        r.consecutive_failures = 0
        r.consecutive_successes += 1
        if not r.healthy and r.consecutive_successes >= readmit_after:
            r.healthy = True
            # A replica is on probation until its first passing check; that is no *re*admission.
            return "readmitted" if r.ejections else "admitted"
    else:
        r.consecutive_successes = 0
        r.consecutive_failures += 1
        if r.healthy and r.consecutive_failures >= eject_after:
            r.healthy = False
            r.ejections += 1
            return "ejected"
    return None


async def probe(client: httpx.AsyncClient, r: ReplicaState, timeout_s: float) -> bool:
    """GET /health, then (if alive) /metrics to refresh the load fields."""
    try:
        resp = await client.get(f"{r.url}/health", timeout=timeout_s)
        if resp.status_code != 200:
            return False
    except httpx.HTTPError:
        return False
    try:
        resp = await client.get(f"{r.url}/metrics", timeout=timeout_s)
        # A replica without these metrics (or without /metrics) is routed as if idle.
        load = parse_load_metrics(resp.text) if resp.status_code == 200 else (0, 0, 0.0)
    except (httpx.HTTPError, ValueError):
        load = (0, 0, 0.0)
    r.apply_metrics(*load)
    return True
