"""A client that leaves before its answer is in hand: the router must hang up on the replica too, or
the replica generates the whole answer for nobody (docs/api.md: the server aborts on a disconnect)."""

from __future__ import annotations

import socket
import time
from urllib.parse import urlsplit

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


def test_client_leaving_mid_request_body_is_not_an_error(fleet, router_server, capfd):

    (replica,), servers = fleet(FakeReplica("a"))
    router = router_server(config([servers[0].url]))
    url = urlsplit(router.url)
    with socket.create_connection((url.hostname, url.port), timeout=5) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"prompt\": ")  # 11 of the 1000 bytes, then gone
    with httpx.Client(base_url=router.url, timeout=10) as c:  # the router still answers
        wait_for(lambda: c.post("/v1/completions", json=COMPLETION).status_code == 200, timeout=5)
    assert replica.hits >= 1 and all(r.in_flight == 0 for r in router_state(router).replicas)
    time.sleep(0.2)  # uvicorn logs an endpoint's exception after the response it could not send
    assert "Exception in ASGI application" not in capfd.readouterr().err
