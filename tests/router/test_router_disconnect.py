"""A client that leaves before its answer is in hand: the router must hang up on the replica too, or
the replica generates the whole answer for nobody (docs/api.md: the server aborts on a disconnect)."""

from __future__ import annotations

import httpx
import pytest

from tests.router.router_fakes import FakeReplica
from tests.router.test_router_proxy import COMPLETION, config, metric, router_state
from tests.server_thread import wait_for


@pytest.mark.parametrize("stream", [False, True], ids=["buffered", "stream-before-first-byte"])
def test_client_timeout_reaches_the_replica(fleet, router_server, stream):
    (held,), servers = fleet(FakeReplica("held", hold_until_disconnect=True))
    router = router_server(config([servers[0].url]))
    state = router_state(router).replicas[0]
    with httpx.Client(base_url=router.url, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json={**COMPLETION, "max_tokens": 1000, "stream": stream})
    # The replica sees its own client (the router) go within moments, not when it would have finished.
    wait_for(lambda: held.disconnects == 1, timeout=5)
    wait_for(lambda: state.in_flight == 0, timeout=5)
    assert held.hits == 1  # nobody retried the abandoned request elsewhere
    with httpx.Client(base_url=router.url, timeout=10) as c:
        assert metric(c, "leanserve_router_requests_total", replica=servers[0].url, status="cancelled") == 1
        assert metric(c, "leanserve_router_in_flight", replica=servers[0].url) == 0


def test_router_keeps_serving_after_a_client_left(fleet, router_server):
    (held, ok), servers = fleet(FakeReplica("held", hold_until_disconnect=True), FakeReplica("ok"))
    router = router_server(config([s.url for s in servers]))
    with httpx.Client(base_url=router.url, timeout=0.3) as c, pytest.raises(httpx.ReadTimeout):
        c.post("/v1/completions", json=COMPLETION)  # round-robin: the held replica first
    wait_for(lambda: held.disconnects == 1, timeout=5)
    held.hold_until_disconnect = False
    with httpx.Client(base_url=router.url, timeout=10) as c:
        texts = sorted(c.post("/v1/completions", json=COMPLETION).json()["choices"][0]["text"] for _ in range(2))
    assert texts == ["held", "ok"]
    assert all(r.in_flight == 0 for r in router_state(router).replicas)
