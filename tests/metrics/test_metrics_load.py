"""The bar: a live scrape during a load test agrees with the load generator's own counts."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter

import httpx

from tests.metrics.loadgen import LoadResult, make_requests, run_load
from tests.metrics.metrics_harness import (
    Scrape,
    bucket_index,
    diff_buckets,
    exact_quantile,
    histogram_quantile,
    parse_scrape,
    scrape,
)

NUM_REQUESTS = 20

VLLM_FAMILIES = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions", "vllm:prompt_tokens", "vllm:generation_tokens", "vllm:request_success",
    "vllm:prefix_cache_queries", "vllm:prefix_cache_hits", "vllm:time_to_first_token_seconds",
    "vllm:inter_token_latency_seconds", "vllm:e2e_request_latency_seconds",
    "vllm:request_queue_time_seconds", "vllm:iteration_tokens_total", "vllm:request_prompt_tokens",
    "vllm:request_generation_tokens", "vllm:cache_config_info",
]
LEANSERVE_FAMILIES = [
    "leanserve_batch_size", "leanserve_batch_window_seconds", "leanserve_kv_blocks",
    "leanserve_kv_blocks_free", "leanserve_engine_step_seconds", "leanserve_engine_idle_ratio",
    "leanserve_engine_busy_seconds", "leanserve_cost_usd", "leanserve_cost_per_1k_requests_usd",
    "leanserve_cost_per_1m_output_tokens_usd", "leanserve_request_mean_nll",
    "leanserve_gpu_utilization_ratio", "leanserve_gpu_memory_used_bytes", "leanserve_gpu_power_watts",
]
COUNTERS = ["vllm:prompt_tokens_total", "vllm:generation_tokens_total"]


async def _load_with_scrapes(url: str, api: str) -> tuple[LoadResult, list[Scrape]]:
    """Run the load and scrape /metrics continuously while it is in flight."""
    load = asyncio.create_task(run_load(url, make_requests(NUM_REQUESTS, seed=1), concurrency=8, api=api))
    texts = []
    async with httpx.AsyncClient(timeout=10) as client:
        while not load.done():
            texts.append((await client.get(f"{url}/metrics")).text)
            await asyncio.sleep(0.05)
    # Parse afterwards: parsing on this loop would delay reading the streams and skew client TTFT.
    return await load, [parse_scrape(t) for t in texts]


def _settled_scrape(url: str, before: Scrape, expected_requests: int) -> Scrape:
    """The engine posts outputs before its listeners run: wait for the last step's record."""
    deadline = time.monotonic() + 5
    while True:
        after = scrape(url)
        done = after.value("vllm:request_success_total") - before.value("vllm:request_success_total")
        if done >= expected_requests or time.monotonic() > deadline:
            return after
        time.sleep(0.01)


def test_live_scrape_agrees_with_load_generator(live_server) -> None:
    url = live_server.url
    # Warm up first (connection pool, first-request costs), so the client's latencies measure serving.
    asyncio.run(run_load(url, make_requests(2, seed=99), concurrency=2, api=live_server.api))
    before = scrape(url)
    load, mids = asyncio.run(_load_with_scrapes(url, live_server.api))
    after = _settled_scrape(url, before, NUM_REQUESTS)
    n = len(load.results)
    assert n == NUM_REQUESTS

    def delta(name: str, **labels: str) -> float:
        prior = before.value(name, **labels) if any(k[0] == name for k in before.samples) else 0.0
        return after.value(name, **labels) - prior

    # Every family, during the load as well as after it.
    for fam in VLLM_FAMILIES + LEANSERVE_FAMILIES:
        assert fam in after.families, f"{fam} missing from /metrics"
    assert mids, "no scrape landed while the load was in flight"
    assert all(set(VLLM_FAMILIES) <= set(m.families) for m in mids)

    # Counts agree exactly with what the client saw.
    assert delta("vllm:prompt_tokens_total") == load.prompt_tokens
    assert delta("vllm:generation_tokens_total") == load.output_tokens
    for reason, count in Counter(r.finish_reason for r in load.results).items():
        assert delta("vllm:request_success_total", finished_reason=reason) == count
    assert delta("vllm:request_success_total") == n
    for fam in ("vllm:time_to_first_token_seconds", "vllm:e2e_request_latency_seconds",
                "vllm:request_queue_time_seconds", "vllm:request_prefill_time_seconds",
                "vllm:request_decode_time_seconds", "vllm:request_inference_time_seconds",
                "vllm:request_prompt_tokens", "vllm:request_generation_tokens",
                "leanserve_request_mean_nll"):
        assert delta(f"{fam}_count") == n, fam
    assert delta("vllm:request_prompt_tokens_sum") == load.prompt_tokens
    assert delta("vllm:request_generation_tokens_sum") == load.output_tokens
    # One inter-token gap per token after each request's first.
    assert delta("vllm:inter_token_latency_seconds_count") == load.output_tokens - n
    assert delta("leanserve_batch_size_count") == delta("leanserve_engine_step_seconds_count") > 0
    # Every step's tokens: uncached prompt tokens + decode tokens, so between these bounds.
    iteration = delta("vllm:iteration_tokens_total_sum")
    assert load.output_tokens - n <= iteration <= load.prompt_tokens + load.output_tokens

    # Latency percentiles land within one bucket of the client's own measurements.
    for fam, values in (("vllm:time_to_first_token_seconds", [r.ttft for r in load.results]),
                        ("vllm:e2e_request_latency_seconds", [r.e2e for r in load.results])):
        buckets = diff_buckets(after.buckets(fam), before.buckets(fam))
        bounds = [le for le, _ in buckets]
        for q in (0.5, 0.95):
            server = histogram_quantile(q, buckets)
            client = exact_quantile(values, q)
            assert abs(bucket_index(server, bounds) - bucket_index(client, bounds)) <= 1, (fam, q, server, client)

    # Gauges are sane and agree with the engine.
    engine = live_server.async_engine.engine
    assert any(m.value("vllm:num_requests_running") > 0 for m in mids)
    assert max(m.value("vllm:num_requests_running") for m in mids) <= engine.config.max_num_seqs
    assert max(m.value("vllm:num_requests_waiting") for m in mids) <= NUM_REQUESTS
    for m in [*mids, after]:
        assert 0.0 <= m.value("vllm:kv_cache_usage_perc") <= 1.0
        assert m.value("leanserve_kv_blocks_free") <= m.value("leanserve_kv_blocks")
    assert after.value("leanserve_kv_blocks") == engine.block_manager.num_blocks
    assert after.value("vllm:num_requests_running") == after.value("vllm:num_requests_waiting") == 0
    assert 0 < delta("vllm:prefix_cache_hits_total") <= delta("vllm:prefix_cache_queries_total")
    assert 0.0 <= after.value("leanserve_engine_idle_ratio") <= 1.0
    assert after.value("leanserve_batch_window_seconds") >= 0.0

    # Cost accrues and the windowed unit costs are defined once requests finished.
    assert delta("leanserve_cost_usd_total") > 0
    for name in ("leanserve_cost_per_1k_requests_usd", "leanserve_cost_per_1m_output_tokens_usd"):
        value = after.value(name)
        assert math.isfinite(value) and value > 0, name

    # Quality: a random 300-token model's completions have a mean NLL near ln(300) ~ 5.7 nats.
    nll_buckets = diff_buckets(after.buckets("leanserve_request_mean_nll"),
                               before.buckets("leanserve_request_mean_nll"))
    assert 3.0 <= histogram_quantile(0.5, nll_buckets) <= 8.0

    # GPU families: one series per device (the fake NVML's two boards on a CPU-only machine).
    gpus = {lbls for (name, lbls) in after.samples if name == "leanserve_gpu_utilization_ratio"}
    assert gpus
    if live_server.fake_gpu:
        assert after.value("leanserve_gpu_utilization_ratio", gpu="1") == 0.5
        assert after.value("leanserve_gpu_power_watts", gpu="0") == 300.0
