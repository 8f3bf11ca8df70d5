from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys

import httpx
import pytest

from leanserve.router import discovery
from leanserve.router.cli import add_router_subcommand, config_from_args, run_router
from leanserve.router.proxy import Router, RouterConfig
from tests.router.router_fakes import FakeReplica


def test_subcommand_builds_the_router_config():
    parser = argparse.ArgumentParser(prog="leanserve")
    add_router_subcommand(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["router", "--replica", "http://a:8000", "--replica", "http://b:8000/",
                              "--canary", "http://c:8000", "--canary-weight", "0.1", "--policy", "pack",
                              "--port", "9000", "--min-replicas", "2"])
    assert args.func is run_router and args.port == 9000 and args.host == "127.0.0.1"
    cfg = config_from_args(args)
    assert cfg.replicas == ["http://a:8000", "http://b:8000/"] and cfg.canaries == ["http://c:8000"]
    assert cfg.canary_weight == 0.1 and cfg.policy == "pack" and cfg.autoscaler.min_replicas == 2
    router = Router(cfg)
    assert [r.url for r in router.replicas] == ["http://a:8000", "http://b:8000", "http://c:8000"]
    assert [r.canary for r in router.replicas] == [False, False, True]
    # No canary given: the default weight must not divert traffic to nowhere.
    assert config_from_args(parser.parse_args(["router", "--replica", "http://a"])).canary_weight == 0.0


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "leanserve.router", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--canary-weight" in out.stdout


def test_router_needs_somewhere_to_send():
    with pytest.raises(ValueError):
        Router(RouterConfig(replicas=[]))


def test_resolve_and_parse_target():
    assert "http://127.0.0.1:8123" in discovery.resolve("127.0.0.1", 8123)
    assert discovery.resolve("no-such-host.invalid", 80) == []
    assert discovery.parse_target("svc.ns:8000") == ("svc.ns", 8000)
    with pytest.raises(ValueError):
        discovery.parse_target("svc")


def test_discovery_follows_the_dns_answer(monkeypatch):
    answers = [["http://10.0.0.1:8000", "http://10.0.0.2:8000"], ["http://10.0.0.2:8000"], []]

    async def fake_resolve(host: str, port: int) -> list[str]:
        return answers.pop(0)

    monkeypatch.setattr("leanserve.router.proxy.resolve_async", fake_resolve)
    router = Router(RouterConfig(replicas=[], discover="svc:8000"))

    async def go() -> list[list[str]]:
        seen = []
        for _ in range(3):
            await router._sync_discovered()
            seen.append([r.url for r in router.replicas])
        return seen

    assert asyncio.run(go()) == [
        ["http://10.0.0.1:8000", "http://10.0.0.2:8000"],
        ["http://10.0.0.2:8000"],
        ["http://10.0.0.2:8000"],  # an empty answer is a DNS hiccup, not "no replicas"
    ]


def test_discovered_replica_serves_end_to_end(fleet, router_server):
    _, (server,) = fleet(FakeReplica("found"))
    router = router_server(RouterConfig(replicas=[], discover=f"127.0.0.1:{server.port}", poll_interval_s=0.05))
    with httpx.Client(base_url=router.url, timeout=10) as c:
        r = c.post("/v1/completions", json={"model": "fake", "prompt": "hi"})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == "found"
