"""The collector on a fake engine with a fake clock: exact placement of every observation."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest

from leanserve.engine.llm_engine import StepStats
from leanserve.metrics import setup_metrics
from leanserve.metrics.collector import EngineCollector, build_1_2_5_buckets
from leanserve.metrics.gpu import GpuSampler
from tests.metrics.metrics_harness import (
    Clock,
    FakeNvml,
    fake_engine,
    one_request,
    output,
    parse_scrape,
    require_tool,
    settings_for_test,
)


def render(collector: EngineCollector):
    registry = CollectorRegistry()
    registry.register(collector)
    return parse_scrape(generate_latest(registry).decode())


def test_every_observation_lands_in_its_bucket() -> None:
    clock = Clock()
    collector = EngineCollector(fake_engine(), settings_for_test(), GpuSampler(nvml=None), clock=clock)
    one_request(collector)
    clock.now = 10.0
    s = render(collector)

    assert s.value("vllm:prompt_tokens_total") == 10
    assert s.value("vllm:generation_tokens_total") == 3
    assert s.value("vllm:request_success_total", finished_reason="length") == 1
    assert s.value("vllm:request_success_total", finished_reason="stop") == 0
    assert s.value("vllm:num_requests_running") == 2 and s.value("vllm:num_requests_waiting") == 1
    assert s.value("vllm:kv_cache_usage_perc") == 0.25
    assert s.value("vllm:num_preemptions_total") == 3
    assert s.value("vllm:prefix_cache_hits_total") == 4
    assert s.value("vllm:prefix_cache_queries_total") == 10
    assert s.value("leanserve_kv_blocks") == 100 and s.value("leanserve_kv_blocks_free") == 75
    assert s.value("leanserve_batch_window_seconds") == 0.005

    def one_in(family: str, le: str) -> None:
        cumulative = dict((str(b), c) for b, c in s.buckets(family))
        below = max((b for b, _ in s.buckets(family) if b < float(le)), default=None)
        assert cumulative[str(float(le))] == 1, (family, cumulative)
        if below is not None:
            assert cumulative[str(below)] == 0, (family, cumulative)

    one_in("vllm:time_to_first_token_seconds", "1.0")  # 1.0 - 0.0
    one_in("vllm:e2e_request_latency_seconds", "1.5")  # 1.5 - 0.0
    one_in("vllm:request_queue_time_seconds", "0.5")  # 0.5 - 0.0
    one_in("vllm:request_prefill_time_seconds", "0.5")  # 1.0 - 0.5
    one_in("vllm:request_decode_time_seconds", "0.5")  # 1.5 - 1.0
    one_in("vllm:request_inference_time_seconds", "1.0")  # 1.5 - 0.5
    one_in("vllm:request_prompt_tokens", "10")
    one_in("vllm:request_generation_tokens", "5")
    one_in("leanserve_request_mean_nll", "2.0")
    assert s.value("vllm:inter_token_latency_seconds_count") == 2  # 0.2 and 0.3
    assert s.value("vllm:inter_token_latency_seconds_sum") == pytest.approx(0.5)
    assert s.value("vllm:time_per_output_token_seconds_count") == 2
    assert s.value("vllm:iteration_tokens_total_sum") == 12
    assert s.value("leanserve_batch_size_count") == 3
    assert s.value("leanserve_engine_busy_seconds_total") == pytest.approx(0.3)
    assert s.value("leanserve_engine_idle_ratio") == pytest.approx(1 - 0.3 / 10)

    # Cost: CPU host at $3.60/h = $0.001/s; 10 s accrued; one request and three tokens in the window.
    assert s.value("leanserve_cost_usd_per_hour") == pytest.approx(3.6)
    assert s.value("leanserve_cost_usd_total") == pytest.approx(0.01)
    assert s.value("leanserve_cost_per_1k_requests_usd") == pytest.approx(10.0)
    assert s.value("leanserve_cost_per_1m_output_tokens_usd") == pytest.approx(0.01 / 3 * 1e6)
    # No NVML: no GPU families, and no error.
    assert not any(name.startswith("leanserve_gpu_") for name in s.sample_names)


def test_windows_expire_and_unit_costs_become_undefined() -> None:
    clock = Clock()
    collector = EngineCollector(fake_engine(), settings_for_test(window_seconds=60),
                                GpuSampler(nvml=None), clock=clock)
    one_request(collector)
    clock.now = 1000.0
    s = render(collector)
    assert math.isnan(s.value("leanserve_cost_per_1k_requests_usd"))
    assert math.isnan(s.value("leanserve_cost_per_1m_output_tokens_usd"))
    assert s.value("leanserve_engine_idle_ratio") == 1.0
    assert s.value("leanserve_cost_usd_total") == pytest.approx(1.0)  # 1000 s at $0.001/s


def test_gpu_price_scales_with_gpus() -> None:
    collector = EngineCollector(fake_engine("cuda"), settings_for_test(usd_per_gpu_hour=2.5, num_gpus=4),
                                GpuSampler(nvml=None), clock=Clock())
    assert collector.usd_per_hour == pytest.approx(10.0)


def test_listener_only_records() -> None:
    """The engine thread pays one append; nothing is aggregated until a scrape or the reporter drains."""
    collector = EngineCollector(fake_engine(), settings_for_test(), GpuSampler(nvml=None), clock=Clock())
    collector.attach()
    listener = collector.async_engine.step_listeners[0]
    listener(StepStats(num_seqs=1, num_decode_tokens=1), [output("r1", 1)], collector.async_engine)
    assert len(collector.recorder.pending) == 1 and collector.stats.generation_tokens == 0
    collector.stats.drain()
    assert not collector.recorder.pending and collector.stats.generation_tokens == 1
    collector.detach()
    assert collector.async_engine.step_listeners == []


def test_gpu_families_from_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    collector = EngineCollector(fake_engine("cuda"), settings_for_test(), GpuSampler(FakeNvml(2)), clock=Clock())
    s = render(collector)
    assert s.value("leanserve_gpu_utilization_ratio", gpu="0") == 0.4
    assert s.value("leanserve_gpu_memory_used_bytes", gpu="1") == 2 << 30
    assert s.value("leanserve_gpu_memory_total_bytes", gpu="1") == 80 << 30
    assert s.value("leanserve_gpu_power_watts", gpu="0") == 300.0
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    only_one = GpuSampler(FakeNvml(2)).sample()
    assert [g.index for g in only_one] == [1]


def test_gpu_sampler_survives_missing_driver() -> None:
    class Broken(FakeNvml):
        def nvmlInit(self) -> None:  # noqa: N802
            raise RuntimeError("NVML Shared Library Not Found")

    assert GpuSampler(Broken()).sample() == []
    assert GpuSampler(nvml=None).available is False


def test_real_pynvml_is_harmless_here() -> None:
    """With nvidia-ml-py installed but no GPU (CI), sampling returns nothing and raises nothing."""
    sampler = GpuSampler()
    samples = sampler.sample()
    assert all(0.0 <= g.utilization <= 1.0 for g in samples)


def test_length_buckets_match_vllm() -> None:
    assert build_1_2_5_buckets(512) == (1, 2, 5, 10, 20, 50, 100, 200, 500)
    assert build_1_2_5_buckets(1000) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


def test_setup_metrics_takes_the_engine_from_app_state_at_startup() -> None:
    apps = []
    for name in ("a", "b"):  # two apps in one process: separate registries, no clash
        app = FastAPI()
        handle = setup_metrics(app, None, SimpleNamespace(served_model_name=name, progress_interval_s=0.05))
        app.state.engine = fake_engine()
        apps.append((app, handle))
    for app, handle in apps:
        with TestClient(app) as client:
            assert handle.collector is not None and handle.reporter is not None
            text = client.get("/metrics").text
            name = handle.settings.served_model_name
            assert f'vllm:num_requests_running{{model_name="{name}"}} 2.0' in text
        assert handle.reporter._thread is None  # stopped with the app


def test_require_tool_skips_outside_ci_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_tool("/usr/bin/x", "x", "apt-get install x") == "/usr/bin/x"
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="CI is unset"):
        require_tool(None, "x", "apt-get install x")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI must install it"):
        require_tool(None, "x", "apt-get install x")


def test_millisecond_latencies_land_in_fine_buckets() -> None:
    """A ~1 ms decode step (an H200) and a few ms in the queue each get a bucket of their own; vLLM's
    buckets started at 10 ms and 0.3 s, so every such percentile was interpolated inside the first."""
    clock = Clock()
    collector = EngineCollector(fake_engine(), settings_for_test(), GpuSampler(nvml=None), clock=clock)
    prefill = StepStats(num_seqs=1, num_prefill_tokens=10, step_seconds=0.007)
    decode = StepStats(num_seqs=1, num_decode_tokens=1, step_seconds=0.0012)
    times = dict(arrival_time=0.0, first_scheduled_time=0.003, first_token_time=0.010)  # 3 ms queued
    pending = collector.recorder.pending
    pending.append((0.010, prefill, [output("r1", 1, **times)]))
    pending.append((0.0112, decode, [output("r1", 2, **times)]))  # 1.2 ms apart
    pending.append((0.0124, decode, [output("r1", 3, finished=True, **times)]))
    clock.now = 10.0
    s = render(collector)

    def only_in(family: str, le: float, below: float) -> None:
        cumulative = dict(s.buckets(family))
        assert cumulative[below] == 0 and cumulative[le] == cumulative[float("inf")], (family, cumulative)

    only_in("vllm:inter_token_latency_seconds", le=0.0015, below=0.001)
    only_in("vllm:time_per_output_token_seconds", le=0.0015, below=0.001)
    only_in("vllm:request_queue_time_seconds", le=0.005, below=0.0025)
    only_in("vllm:request_prefill_time_seconds", le=0.01, below=0.005)


def test_latency_buckets_keep_every_vllm_boundary() -> None:
    """Dashboards and alerts written for vLLM may pick a vLLM ``le``; each must still be there."""
    from leanserve.metrics import collector as c

    vllm_itl = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
    vllm_request = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                    240.0, 480.0, 960.0, 1920.0, 7680.0)
    collector = EngineCollector(fake_engine(), settings_for_test(), GpuSampler(nvml=None), clock=Clock())
    s = render(collector)
    for family, vllm, first in (("vllm:inter_token_latency_seconds", vllm_itl, 0.001),
                                ("vllm:request_queue_time_seconds", vllm_request, 0.001),
                                ("vllm:e2e_request_latency_seconds", vllm_request, 0.3)):
        bounds = [le for le, _ in s.buckets(family)]
        assert set(vllm) <= set(bounds), family
        assert bounds == sorted(bounds) and min(b for b in bounds if b >= first) == first, family
    assert c.ITL_BUCKETS[0] < 0.001 and c.QUEUE_AND_PREFILL_BUCKETS[0] == 0.001
