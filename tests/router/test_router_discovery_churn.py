"""Pods come and go under discovery: a replica that leaves takes its metric series with it (or the
series count grows with every rollout), but not before the requests still on it have finished."""

from __future__ import annotations

import asyncio
import threading

import httpx

from leanserve.router.proxy import Router, RouterConfig
from tests.router.router_fakes import FakeReplica, free_port
from tests.router.test_router_proxy import COMPLETION, metric, router_state
from tests.server_thread import wait_for


def follow(monkeypatch, answer: list[str]) -> None:
    """Discovery resolves to whatever `answer` holds at each poll."""
    async def fake_resolve(host: str, port: int) -> list[str]:
        return list(answer)

    monkeypatch.setattr("leanserve.router.proxy.resolve_async", fake_resolve)


def discovering(**kw) -> RouterConfig:
    return RouterConfig(replicas=[], discover="svc:8000", policy="round-robin", poll_interval_s=0.05,
                        readmit_after=1, **kw)


def series_for(client: httpx.Client, url: str) -> list[str]:
    return [line for line in client.get("/metrics").text.splitlines()
            if f'replica="{url}"' in line and not line.startswith("#")]


def test_a_dropped_replica_takes_its_series_with_it(monkeypatch, fleet, router_server):
    _, (a, b) = fleet(FakeReplica("a"), FakeReplica("b"))
    answer = [a.url, b.url]
    follow(monkeypatch, answer)
    router = router_server(discovering())
    with httpx.Client(base_url=router.url, timeout=10) as c:
        for _ in range(4):
            assert c.post("/v1/completions", json=COMPLETION).status_code == 200
        assert metric(c, "leanserve_router_requests_total", replica=a.url, status="200") == 2
        assert series_for(c, a.url)
        answer.remove(a.url)
        wait_for(lambda: not series_for(c, a.url))
        assert metric(c, "leanserve_router_requests_total", replica=b.url, status="200") == 2
        # Back under the same address: counted afresh, not from where the old pod left off.
        answer.append(a.url)
        wait_for(lambda: any(r.url == a.url and r.healthy for r in router_state(router).replicas))
        for _ in range(2):
            c.post("/v1/completions", json=COMPLETION)
        assert metric(c, "leanserve_router_requests_total", replica=a.url, status="200") == 1


def test_series_outlive_the_replica_until_its_last_request_ends(monkeypatch, fleet, router_server):
    gate = threading.Event()
    _, (a,) = fleet(FakeReplica("a", stream_gate=gate))
    answer = [a.url]
    follow(monkeypatch, answer)
    router = router_server(discovering())
    with httpx.Client(base_url=router.url, timeout=10) as c:
        with c.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as resp:
            lines = resp.iter_lines()
            assert next(lines).startswith("data:")
            gone = f"http://127.0.0.1:{free_port()}"  # a resolves away; a pod not serving yet replaces it
            answer[:] = [gone]
            wait_for(lambda: [r.url for r in router_state(router).replicas] == [gone])
            assert metric(c, "leanserve_router_in_flight", replica=a.url) == 1  # still being served
            for _ in range(2):
                gate.set()
                next(line for line in lines if line)
            rest = [line for line in lines if line]
        assert rest == ["data: [DONE]"]
        wait_for(lambda: not series_for(c, a.url))


def test_static_replicas_survive_discovery_however_they_were_spelled(monkeypatch):
    follow(monkeypatch, ["http://10.0.0.1:8000"])
    router = Router(RouterConfig(replicas=["http://static:8000/"], discover="svc:8000"))
    asyncio.run(router._sync_discovered())
    assert [r.url for r in router.replicas] == ["http://static:8000", "http://10.0.0.1:8000"]


def test_a_request_ending_on_a_retired_replica_leaves_its_returned_address_alone(monkeypatch):
    """A pod restarted in place: the old object's last request must not write the new one's gauge."""
    answer = ["http://10.0.0.1:8000"]
    follow(monkeypatch, answer)
    router = Router(RouterConfig(replicas=[], discover="svc:8000"))
    asyncio.run(router._sync_discovered())
    old = router.replicas[0]
    old.in_flight = 2  # two requests still on the old pod
    answer[:] = ["http://10.0.0.2:8000"]
    asyncio.run(router._sync_discovered())
    answer[:] = ["http://10.0.0.1:8000"]
    asyncio.run(router._sync_discovered())
    new = next(r for r in router.replicas if r.url == old.url)
    new.in_flight = 1
    gauge = router.metrics.in_flight.labels(new.url)
    gauge.set(1)
    router._release(old)
    router._release(old)
    assert old.in_flight == 0 and gauge._value.get() == 1
