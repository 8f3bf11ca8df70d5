"""The proxy end to end: real uvicorn servers on loopback, the router in between."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

from leanserve.router.proxy import RouterConfig
from tests.router.router_fakes import FakeReplica, ServerThread, free_port
from tests.server_thread import wait_for

COMPLETION = {"model": "fake", "prompt": "hello", "max_tokens": 4}


def config(urls: list[str], **kw) -> RouterConfig:
    base = dict(replicas=urls, policy="round-robin", poll_interval_s=0.05, eject_after=2, readmit_after=2,
                health_timeout_s=1.0, seed=1)
    base.update(kw)
    return RouterConfig(**base)


def router_state(server: ServerThread):
    return server.server.config.app.state.router


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    text = client.get("/metrics").text
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_forwards_openai_routes_and_exposes_metrics(fleet, router_server):
    (a, b), servers = fleet(FakeReplica("a"), FakeReplica("b"))
    router = router_server(config([s.url for s in servers]))
    with httpx.Client(base_url=router.url, timeout=10) as c:
        texts = [c.post("/v1/completions", json=COMPLETION).json()["choices"][0]["text"] for _ in range(4)]
        assert sorted(texts) == ["a", "a", "b", "b"]
        chat = c.post("/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user",
                                                                                     "content": "hi"}]})
        assert chat.status_code == 200 and chat.headers["x-leanserve-replica"] in {s.url for s in servers}
        assert c.get("/v1/models").json()["data"][0]["id"] == "fake"
        health = c.get("/health")
        assert health.status_code == 200 and health.json()["healthy_replicas"] == 2
        assert metric(c, "leanserve_router_requests_total", replica=servers[0].url, status="200") >= 2
        assert metric(c, "leanserve_router_healthy_replicas") == 2
        assert metric(c, "leanserve_desired_replicas") >= 1
        missing = c.get("/v1/nope")
        assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param",
                                                                                  "code"}


def test_streaming_is_passed_through_chunk_by_chunk(fleet, router_server):
    gate = threading.Event()
    (a,), servers = fleet(FakeReplica("a", stream_gate=gate))
    router = router_server(config([servers[0].url]))
    received: list[str] = []
    with httpx.Client(base_url=router.url, timeout=10) as c, \
            c.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        for line in resp.iter_lines():
            if not line:
                continue
            received.append(line)
            # The replica holds chunk i+1 until we have seen chunk i: a buffering proxy would
            # deadlock here (and the client timeout would fail the test).
            gate.set()
    assert received[:3] == [f'data: {json.dumps({"choices": [{"index": 0, "text": f"a-{i}"}]})}'
                            for i in range(3)]
    assert received[-1] == "data: [DONE]"
    wait_for(lambda: router_state(router).replicas[0].in_flight == 0)  # the stream released its slot


@pytest.mark.parametrize("status", [503, 429, 500])
def test_retries_on_overload_status_before_first_token(fleet, router_server, status):
    (bad, good), servers = fleet(FakeReplica("bad", fail_status=status), FakeReplica("good"))
    router = router_server(config([s.url for s in servers]))
    with httpx.Client(base_url=router.url, timeout=10) as c:
        for stream in (False, True):
            for _ in range(3):
                r = c.post("/v1/completions", json={**COMPLETION, "stream": stream})
                assert r.status_code == 200 and "good" in r.text
        assert bad.hits >= 2  # round-robin did send some to the bad replica first ...
        assert metric(c, "leanserve_router_retries_total") == bad.hits  # ... and each was retried
    wait_for(lambda: all(r.in_flight == 0 for r in router_state(router).replicas))


def test_all_replicas_failing_returns_the_last_error(fleet, router_server):
    _, servers = fleet(FakeReplica("x", fail_status=503), FakeReplica("y", fail_status=503))
    router = router_server(config([s.url for s in servers]))
    with httpx.Client(base_url=router.url, timeout=10) as c:
        r = c.post("/v1/completions", json=COMPLETION)
    assert r.status_code == 503 and r.json()["error"]["message"] == "busy"


def test_client_errors_are_not_retried(fleet, router_server):
    (bad, good), servers = fleet(FakeReplica("bad", fail_status=400), FakeReplica("good", fail_status=400))
    router = router_server(config([s.url for s in servers]))
    with httpx.Client(base_url=router.url, timeout=10) as c:
        assert c.post("/v1/completions", json=COMPLETION).status_code == 400
    assert bad.hits + good.hits == 1


def test_retries_when_a_stream_dies_before_its_first_byte(fleet, router_server):
    (bad, good), servers = fleet(FakeReplica("bad", drop_before_first_chunk=True), FakeReplica("good"))
    router = router_server(config([s.url for s in servers]))
    with httpx.Client(base_url=router.url, timeout=10) as c:
        for _ in range(4):
            r = c.post("/v1/completions", json={**COMPLETION, "stream": True})
            assert r.status_code == 200 and "good-0" in r.text and r.text.endswith("data: [DONE]\n\n")
    assert bad.hits >= 2


def test_connect_error_is_retried_and_passively_ejects(fleet, router_server):
    (a, b), servers = fleet(FakeReplica("a"), FakeReplica("b"))
    # Poll rarely, so only the failed requests themselves can notice the replica is gone.
    router = router_server(config([s.url for s in servers], poll_interval_s=30))
    servers[0].stop()
    with httpx.Client(base_url=router.url, timeout=10) as c:
        for _ in range(6):
            r = c.post("/v1/completions", json=COMPLETION)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == "b"
        assert metric(c, "leanserve_router_ejections_total", replica=servers[0].url) == 1
        assert metric(c, "leanserve_router_retries_total") == 2  # eject_after=2 connect errors


def test_ejection_and_readmission_follow_health_checks(fleet, router_server):
    (a, b), servers = fleet(FakeReplica("a"), FakeReplica("b"))
    router = router_server(config([s.url for s in servers]))
    state = router_state(router)
    with httpx.Client(base_url=router.url, timeout=10) as c:
        a.healthy = False
        wait_for(lambda: not state.replicas[0].healthy)
        a.hits = 0
        texts = {c.post("/v1/completions", json=COMPLETION).json()["choices"][0]["text"] for _ in range(6)}
        assert texts == {"b"} and a.hits == 0
        assert metric(c, "leanserve_router_ejections_total", replica=servers[0].url) == 1
        assert c.get("/health").json()["healthy_replicas"] == 1
        a.healthy = True
        wait_for(lambda: state.replicas[0].healthy)
        texts = {c.post("/v1/completions", json=COMPLETION).json()["choices"][0]["text"] for _ in range(6)}
        assert texts == {"a", "b"}
        assert metric(c, "leanserve_router_readmissions_total", replica=servers[0].url) == 1


def test_no_healthy_replica_is_an_openai_503(router_server):
    router = router_server(config([f"http://127.0.0.1:{free_port()}"]))
    with httpx.Client(base_url=router.url, timeout=10) as c:
        r = c.post("/v1/completions", json=COMPLETION)
        assert r.status_code == 503
        assert r.json() == {"error": {"message": "no healthy replica to serve the request",
                                      "type": "service_unavailable", "param": None,
                                      "code": "no_healthy_replica"}}
        assert c.get("/health").status_code == 503


def test_canary_split_over_400_requests(fleet, router_server):
    (a, b, canary), servers = fleet(FakeReplica("a"), FakeReplica("b"), FakeReplica("canary"))
    cfg = config([servers[0].url, servers[1].url], canaries=[servers[2].url], canary_weight=0.2,
                 policy="least-loaded", seed=None)
    router = router_server(cfg)
    with httpx.Client(base_url=router.url, timeout=10) as c:
        for _ in range(400):
            assert c.post("/v1/completions", json=COMPLETION).status_code == 200
    # Binomial(400, 0.2): mean 80, sd 8. +-4 sd keeps an unseeded run from flaking.
    assert 48 <= canary.hits <= 112
    assert a.hits + b.hits + canary.hits == 400 and abs(a.hits - b.hits) <= 20


def test_least_loaded_follows_polled_queue_depth(fleet, router_server):
    (busy, idle), servers = fleet(FakeReplica("busy", waiting=20, running=30), FakeReplica("idle"))
    router = router_server(config([s.url for s in servers], policy="least-loaded"))
    wait_for(lambda: router_state(router).replicas[0].waiting == 20)
    with httpx.Client(base_url=router.url, timeout=10) as c:
        for _ in range(10):
            c.post("/v1/completions", json=COMPLETION)
        assert busy.hits == 0 and idle.hits == 10
        # A replica without the vllm:* metrics counts as idle, not as broken.
        idle.expose_metrics = False
        busy.waiting = busy.running = 0
        wait_for(lambda: router_state(router).replicas[0].waiting == 0)
        for _ in range(10):
            c.post("/v1/completions", json=COMPLETION)
        assert busy.hits == 5 and idle.hits == 15


def test_client_hanging_up_mid_stream_releases_the_replica(fleet, router_server):
    gate = threading.Event()  # never set: the replica stalls after its first chunk
    _, servers = fleet(FakeReplica("a", stream_gate=gate))
    router = router_server(config([servers[0].url]))
    state = router_state(router)
    with httpx.Client(base_url=router.url, timeout=10) as c, \
            c.stream("POST", "/v1/completions", json={**COMPLETION, "stream": True}) as resp:
        lines = resp.iter_lines()  # keep a reference: a dropped iterator closes the connection
        assert next(lines).startswith("data:")
        assert state.replicas[0].in_flight == 1
    wait_for(lambda: state.replicas[0].in_flight == 0)
