from __future__ import annotations

import random
from collections import Counter

import pytest

from leanserve.router.health import record_check
from leanserve.router.policies import (
    LeastLoaded,
    Pack,
    PrefixAffinity,
    RoundRobin,
    choose_pool,
    load_score,
    make_policy,
)
from leanserve.router.replica import LatencyWindow, ReplicaState, parse_load_metrics


def fleet(n: int, **kw) -> list[ReplicaState]:
    return [ReplicaState(url=f"http://r{i}", **kw) for i in range(n)]


def send(policy, replicas, n: int, key: str = "") -> Counter:
    """Route n requests the way the proxy does: each one raises the chosen replica's in-flight."""
    hits: Counter = Counter()
    for _ in range(n):
        r = policy.choose(replicas, key)
        r.in_flight += 1
        hits[r.url] += 1
    return hits


def test_round_robin_cycles_over_healthy_only():
    rs = fleet(3)
    rs[1].healthy = False
    rr = RoundRobin()
    assert [rr.choose(rs).url for _ in range(4)] == ["http://r0", "http://r2", "http://r0", "http://r2"]
    for r in rs:
        r.healthy = False
    assert rr.choose(rs) is None


def test_load_counts_router_in_flight_when_metrics_are_missing_or_stale():
    r = ReplicaState(url="x")
    r.in_flight = 5  # replica exposes no metrics: polled values stay 0
    assert r.load == 5
    r.apply_metrics(waiting=2, running=5, kv_usage=0.0)  # poll saw our 5 plus 2 from elsewhere
    assert r.load == 7
    r.in_flight += 3  # sent since the poll
    assert r.load == 10
    r.in_flight -= 8  # all of ours finished since the poll: the 2 from elsewhere remain
    assert r.load == 2


def test_least_loaded_spreads_a_burst_between_polls():
    rs = fleet(4)
    hits = send(LeastLoaded(), rs, 40)
    assert set(hits.values()) == {10}


def test_least_loaded_avoids_a_replica_with_a_polled_queue():
    rs = fleet(3)
    rs[0].apply_metrics(waiting=6, running=8, kv_usage=0.5)
    hits = send(LeastLoaded(), rs, 10)
    assert hits["http://r0"] == 0
    assert hits["http://r1"] == hits["http://r2"] == 5


def test_least_loaded_weighs_kv_usage_and_capacity():
    a, b = fleet(2)
    a.kv_usage = 0.95
    assert LeastLoaded().choose([a, b]) is b
    big, small = fleet(2)
    big.weight = 2.0
    hits = send(LeastLoaded(), [big, small], 30)
    assert hits[big.url] == 20 and hits[small.url] == 10
    assert load_score(big) == pytest.approx(load_score(small))


def test_prefix_affinity_is_sticky_and_spreads_keys():
    rs = fleet(4)
    pa = PrefixAffinity(prefix_chars=16)
    first = pa.choose(rs, "You are a helpful assistant. Q1")
    # Same first 16 chars -> same replica, whatever follows.
    assert all(pa.choose(rs, f"You are a helpful assistant. Q{i}") is first for i in range(20))
    owners = Counter(pa.choose(rs, f"#{i:04d} system prompt").url for i in range(400))
    assert len(owners) == 4 and min(owners.values()) > 60


def test_prefix_affinity_remaps_only_the_lost_replicas_keys():
    rs = fleet(4)
    pa = PrefixAffinity()
    keys = [f"tenant-{i}" for i in range(300)]
    before = {k: pa.choose(rs, k).url for k in keys}
    rs[2].healthy = False
    after = {k: pa.choose(rs, k).url for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert moved and all(before[k] == "http://r2" for k in moved)


def test_prefix_affinity_breaks_off_when_its_replica_is_overloaded():
    rs = fleet(3)
    pa = PrefixAffinity(max_imbalance=8.0)
    home = pa.choose(rs, "shared prefix")
    home.in_flight = 8  # exactly at the threshold: stay for the cache
    assert pa.choose(rs, "shared prefix") is home
    home.in_flight = 9  # past it: go to the least-loaded
    other = pa.choose(rs, "shared prefix")
    assert other is not home and other.load == 0


def test_pack_fills_one_replica_before_the_next():
    rs = fleet(3)
    pack = Pack(max_concurrency=4)
    hits = send(pack, rs, 10)
    assert hits == Counter({"http://r0": 4, "http://r1": 4, "http://r2": 2})
    # The busiest with headroom wins even if it is not first in the list.
    rs2 = fleet(3)
    rs2[2].in_flight = 2
    assert pack.choose(rs2) is rs2[2]


def test_pack_respects_latency_target_and_falls_back_when_full():
    rs = fleet(2)
    rs[0].in_flight = 3
    rs[0].p95_latency_s = 9.0
    pack = Pack(max_concurrency=8, latency_target_s=5.0)
    assert pack.choose(rs) is rs[1]  # r0 is busier but over the latency target
    for r in rs:
        r.in_flight = 8
    rs[1].in_flight = 9
    assert pack.choose(rs) is rs[0]  # nobody has headroom: least-loaded


def test_make_policy_names():
    for name in ("round-robin", "least-loaded", "prefix-affinity", "pack"):
        assert make_policy(name).name == name
    with pytest.raises(ValueError):
        make_policy("random")


def test_canary_pool_split_and_fallback():
    rs = fleet(3)
    rs[2].canary = True
    rng = random.Random(7)
    picks = [choose_pool(rs, 0.05, rng) for _ in range(4000)]
    frac = sum(p == [rs[2]] for p in picks) / len(picks)
    assert 0.04 < frac < 0.06
    rs[2].healthy = False  # canary down: everything to the primaries
    assert all(choose_pool(rs, 0.5, rng) == rs[:2] for _ in range(50))
    rs[2].healthy = True
    rs[0].healthy = rs[1].healthy = False  # primaries down: the canary beats a 503
    assert choose_pool(rs, 0.0, rng) == [rs[2]]


def test_parse_load_metrics_sums_labels_and_tolerates_absence():
    text = (
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{model_name="a"} 3\nvllm:num_requests_waiting{model_name="b"} 2\n'
        "# TYPE vllm:num_requests_running gauge\nvllm:num_requests_running 7\n"
        "# TYPE vllm:gpu_cache_usage_perc gauge\nvllm:gpu_cache_usage_perc 0.42\n"
        "# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total 12.5\n"
    )
    assert parse_load_metrics(text) == (5, 7, 0.42)
    assert parse_load_metrics("# TYPE other gauge\nother 1\n") == (0, 0, 0.0)
    assert parse_load_metrics("") == (0, 0, 0.0)


def test_latency_window_p95_and_expiry():
    w = LatencyWindow(window_s=10)
    for i in range(100):
        w.add(float(i + 1), now=0.0)
    assert w.p95(now=1.0) == 95.0
    assert w.p95(now=20.0) == 0.0


def test_health_streaks_eject_and_readmit():
    r = ReplicaState(url="x")
    assert record_check(r, False, eject_after=3, readmit_after=2) is None
    assert record_check(r, False, 3, 2) is None
    assert record_check(r, True, 3, 2) is None  # a success resets the failure streak
    assert [record_check(r, False, 3, 2) for _ in range(3)] == [None, None, "ejected"]
    assert not r.healthy
    assert record_check(r, True, 3, 2) is None
    assert record_check(r, True, 3, 2) == "readmitted"
    assert r.healthy


def test_first_admission_is_not_a_readmission():
    r = ReplicaState(url="x", healthy=False, consecutive_successes=0)
    assert record_check(r, True, 3, 1) == "admitted"
