"""Engine metrics: a cheap recorder on the engine thread, aggregation and exposition at scrape time.

The step listener only appends ``(timestamp, stats, outputs)`` to a deque, so the engine's hot loop
pays one ``deque.append`` per step. Everything else (per-request timing, histograms, windows) is
done by ``EngineStats.drain`` on the scraping thread or the progress reporter, whichever comes
first. Gauges that the engine already keeps (queue lengths, KV blocks, preemptions, prefix-cache
counters) are read live at scrape time.

Family names and buckets follow vLLM's so dashboards, KEDA triggers and the inference gateway read
``/metrics`` unchanged; our own families use the ``leanserve_`` prefix.
"""

from __future__ import annotations

import math
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from leanserve.engine.sequence import FinishReason
from leanserve.metrics import cost
from leanserve.metrics.gpu import GpuSampler

# vLLM's boundaries (v1 PrometheusStatLogger), so percentiles are comparable across servers.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
                10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
VLLM_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                    20.0, 40.0, 80.0)
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                           60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)


def with_finer_buckets(vllm: tuple[float, ...], extra: tuple[float, ...]) -> tuple[float, ...]:
    """vLLM's boundaries plus ``extra``: every vLLM ``le`` stays, so its dashboards read ours unchanged."""
    return tuple(sorted(set(vllm) | set(extra)))


# vLLM's inter-token buckets start at 10 ms, but a decode step takes ~1 ms on an H200 and 8-19 ms
# on our CPU host, so every percentile was interpolated inside [0, 10 ms] or [10, 25 ms].
ITL_BUCKETS = with_finer_buckets(VLLM_ITL_BUCKETS, (0.0005, 0.001, 0.0015, 0.002, 0.003, 0.004, 0.005,
                                                    0.0075, 0.015, 0.02))
# vLLM's queue and prefill buckets start at 0.3 s; at low load a request waits for at most a
# batching window (20 ms) and a short prompt's prefill takes milliseconds.
QUEUE_AND_PREFILL_BUCKETS = with_finer_buckets(
    REQUEST_LATENCY_BUCKETS, (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2)
)
ITERATION_TOKENS_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
# Ours.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
STEP_SECONDS_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# Quality: each completion's mean token logprob, exposed negated (mean negative log-likelihood, in
# nats, i.e. log-perplexity) because an exposition with negative buckets may carry no _sum/_count.
# Near 0 = confident; large = the model is guessing (a broken checkpoint or quantization shows up
# here before anyone reads outputs).
MEAN_NLL_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0)

IDLE_WINDOW_S = 60.0
DEFAULT_COST_WINDOW_S = 300.0
MAX_PENDING_STEPS = 100_000  # a safety valve if nothing drains; drops are counted, not silent

Record = tuple[float, Any, list[Any]]  # (monotonic time, StepStats, [RequestOutput])


def build_1_2_5_buckets(max_value: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50, ... up to ``max_value`` (vLLM's length-histogram boundaries)."""
    out: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_value:
                return tuple(out)
            out.append(value)
        exponent += 1


def _batch_window_ms(scheduler: Any) -> float:
    """The batching window the scheduler last applied; 0 for a scheduler without one."""
    value = getattr(scheduler, "current_batch_window_ms", None)
    if value is None:  # the adaptive window keeps it on its BatchWindow
        value = getattr(getattr(scheduler, "window", None), "current_ms", 0.0)
    return float(value or 0.0)


@dataclass
class HistogramState:
    bounds: tuple[float, ...]
    counts: list[int] = field(init=False)  # per bucket, not cumulative; the last is +Inf
    total: float = 0.0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float) -> None:
        # bisect_left puts a value equal to a bound in that bound's bucket: Prometheus' le is <=.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[str, float]]:
        running, out = 0, []
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((floatToGoString(bound), running))
        return out


@dataclass
class StepRecorder:
    """The engine-thread side: ``listener`` is what ``AsyncEngine.step_listeners`` calls."""

    pending: deque[Record] = field(default_factory=lambda: deque(maxlen=MAX_PENDING_STEPS))
    dropped: int = 0

    def listener(self, stats: Any, outputs: list[Any], _async_engine: Any) -> None:
        if len(self.pending) == MAX_PENDING_STEPS:
            self.dropped += 1
        self.pending.append((time.monotonic(), stats, outputs))


class EngineStats:
    """Aggregates step records into counters, histograms and sliding windows."""

    def __init__(self, recorder: StepRecorder, max_model_len: int, cost_window_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.recorder = recorder
        self.clock = clock
        self.cost_window_s = cost_window_s
        # Re-entrant: a scrape holds it across drain + reading so the reporter cannot interleave.
        self.lock = threading.RLock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.busy_seconds = 0.0
        self.success: dict[str, int] = {r.value: 0 for r in FinishReason if r is not FinishReason.ERROR}
        lengths = build_1_2_5_buckets(max(max_model_len, 1))
        self.hist: dict[str, HistogramState] = {
            "ttft": HistogramState(TTFT_BUCKETS),
            "itl": HistogramState(ITL_BUCKETS),
            "e2e": HistogramState(REQUEST_LATENCY_BUCKETS),
            "queue": HistogramState(QUEUE_AND_PREFILL_BUCKETS),
            "inference": HistogramState(REQUEST_LATENCY_BUCKETS),
            "prefill": HistogramState(QUEUE_AND_PREFILL_BUCKETS),
            "decode": HistogramState(REQUEST_LATENCY_BUCKETS),
            "iteration_tokens": HistogramState(ITERATION_TOKENS_BUCKETS),
            "prompt_len": HistogramState(lengths),
            "generation_len": HistogramState(lengths),
            "batch_size": HistogramState(BATCH_SIZE_BUCKETS),
            "step_seconds": HistogramState(STEP_SECONDS_BUCKETS),
            "mean_nll": HistogramState(MEAN_NLL_BUCKETS),
        }
        self._last_token_at: dict[str, float] = {}  # request id -> time of its latest token
        self._steps: deque[tuple[float, float]] = deque()  # (time, busy seconds), last IDLE_WINDOW_S
        self._finished: deque[tuple[float, int]] = deque()  # (time, output tokens), last cost window

    # ---- ingestion ------------------------------------------------------------------------------
    def drain(self) -> None:
        """Fold every pending step record in; safe from any thread."""
        with self.lock:
            pending = self.recorder.pending
            while pending:
                self._ingest(*pending.popleft())
            self._trim(self.clock())

    def _ingest(self, ts: float, stats: Any, outputs: list[Any]) -> None:
        h = self.hist
        self.busy_seconds += stats.step_seconds
        self._steps.append((ts, stats.step_seconds))
        if stats.num_seqs:
            h["batch_size"].observe(stats.num_seqs)
            h["iteration_tokens"].observe(stats.num_prefill_tokens + stats.num_decode_tokens)
            h["step_seconds"].observe(stats.step_seconds)
        for out in outputs:
            n = len(out.new_token_ids)
            self.generation_tokens += n
            rid = out.request_id
            if out.num_output_tokens == n:  # this request's first output: its prompt is done
                self.prompt_tokens += out.num_prompt_tokens
                if n and out.first_token_time is not None:
                    h["ttft"].observe(out.first_token_time - out.arrival_time)
            elif n and rid in self._last_token_at:
                h["itl"].observe(ts - self._last_token_at[rid])
            if n:
                self._last_token_at[rid] = ts
            if out.finished:
                self._finish(ts, out)

    def _finish(self, ts: float, out: Any) -> None:
        h = self.hist
        self._last_token_at.pop(out.request_id, None)
        reason = out.finish_reason or "stop"
        self.success[reason] = self.success.get(reason, 0) + 1
        h["e2e"].observe(ts - out.arrival_time)
        h["prompt_len"].observe(out.num_prompt_tokens)
        h["generation_len"].observe(out.num_output_tokens)
        if out.first_scheduled_time is not None:
            h["queue"].observe(out.first_scheduled_time - out.arrival_time)
            h["inference"].observe(ts - out.first_scheduled_time)
            if out.first_token_time is not None:
                h["prefill"].observe(out.first_token_time - out.first_scheduled_time)
                h["decode"].observe(ts - out.first_token_time)
        if out.mean_logprob is not None and math.isfinite(out.mean_logprob):
            h["mean_nll"].observe(-out.mean_logprob)
        self._finished.append((ts, out.num_output_tokens))

    def _trim(self, now: float) -> None:
        while self._steps and self._steps[0][0] < now - IDLE_WINDOW_S:
            self._steps.popleft()
        while self._finished and self._finished[0][0] < now - self.cost_window_s:
            self._finished.popleft()
        # Requests aborted outside a step never send a finished output here; forget stale ones.
        if len(self._last_token_at) > 1024:
            stale = [r for r, t in self._last_token_at.items() if t < now - 600.0]
            for rid in stale:
                del self._last_token_at[rid]

    # ---- windows --------------------------------------------------------------------------------
    # Callers hold ``lock`` (the windows are deques another thread may be trimming).
    def idle_fraction(self, now: float, since: float) -> float:
        span = min(IDLE_WINDOW_S, now - since)
        if span <= 0:
            return 1.0
        busy = sum(s for t, s in self._steps if t >= now - span)
        return min(max(1.0 - busy / span, 0.0), 1.0)

    def finished_in_window(self) -> tuple[int, int]:
        """(requests, output tokens) finished within the cost window."""
        return len(self._finished), sum(n for _, n in self._finished)


class EngineCollector(Collector):
    """A prometheus-client collector over one ``AsyncEngine``."""

    def __init__(self, async_engine: Any, settings: Any, gpu: GpuSampler | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.async_engine = async_engine
        engine = async_engine.engine
        self.clock = clock
        self.started_at = clock()
        self.model_name = str(getattr(settings, "served_model_name", None) or engine.model_dir.name)
        cost_cfg = getattr(settings, "cost", None)
        self.cost_window_s = float(getattr(cost_cfg, "window_seconds", DEFAULT_COST_WINDOW_S))
        device_type = engine.device.type
        default_price = cost.DEFAULT_USD_PER_GPU_HOUR if device_type == "cuda" else cost.DEFAULT_USD_PER_HOST_HOUR
        self.usd_per_hour = cost.hourly_price(
            device_type,
            float(getattr(cost_cfg, "usd_per_gpu_hour", default_price)),
            int(getattr(cost_cfg, "num_gpus", 1) or 1),
            getattr(cost_cfg, "usd_per_host_hour", None),
        )
        self.recorder = StepRecorder()
        self.stats = EngineStats(self.recorder, engine.max_model_len, self.cost_window_s, clock)
        self.gpu = gpu if gpu is not None else GpuSampler()

    def attach(self) -> None:
        self.async_engine.step_listeners.append(self.recorder.listener)

    def detach(self) -> None:
        if self.recorder.listener in self.async_engine.step_listeners:
            self.async_engine.step_listeners.remove(self.recorder.listener)

    def describe(self) -> list[Metric]:
        return []  # names vary with the GPUs present; skip the registry's duplicate check

    # ---- exposition -----------------------------------------------------------------------------
    def collect(self) -> Iterator[Metric]:
        with self.stats.lock:  # one consistent snapshot: counts, buckets and windows agree
            self.stats.drain()
            now = self.clock()
            families = [*self._vllm_families(), *self._engine_families(now), *self._cost_families(now)]
        yield from families
        yield from self._gpu_families()  # NVML calls take milliseconds: outside the lock

    def _gauge(self, name: str, doc: str, value: float) -> GaugeMetricFamily:
        g = GaugeMetricFamily(name, doc, labels=["model_name"])
        g.add_metric([self.model_name], value)
        return g

    def _counter(self, name: str, doc: str, value: float) -> CounterMetricFamily:
        c = CounterMetricFamily(name, doc, labels=["model_name"])
        c.add_metric([self.model_name], value)
        return c

    def _histogram(self, name: str, doc: str, key: str) -> HistogramMetricFamily:
        state = self.stats.hist[key]
        hist = HistogramMetricFamily(name, doc, labels=["model_name"])
        hist.add_metric([self.model_name], state.cumulative(), state.total)
        return hist

    def _vllm_families(self) -> Iterable[Metric]:
        engine = self.async_engine.engine
        bm = engine.block_manager
        s = self.stats
        yield self._gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                          engine.num_running)
        yield self._gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                          engine.num_waiting)
        yield self._gauge("vllm:kv_cache_usage_perc", "KV-cache usage. 1 means 100 percent usage.", bm.usage)
        yield self._gauge("vllm:gpu_cache_usage_perc",
                          "KV-cache usage. 1 means 100 percent usage. DEPRECATED: use "
                          "vllm:kv_cache_usage_perc (kept for older gateways).", bm.usage)
        yield self._counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                            engine.scheduler.num_preemptions)
        yield self._counter("vllm:prompt_tokens", "Number of prefill tokens processed.", s.prompt_tokens)
        yield self._counter("vllm:generation_tokens", "Number of generation tokens processed.",
                            s.generation_tokens)
        success = CounterMetricFamily("vllm:request_success", "Count of successfully processed requests.",
                                      labels=["model_name", "finished_reason"])
        for reason, n in sorted(s.success.items()):
            success.add_metric([self.model_name, reason], n)
        yield success
        yield self._counter("vllm:prefix_cache_queries",
                            "Prefix cache queries, in terms of number of queried tokens.", bm.prefix_queries)
        yield self._counter("vllm:prefix_cache_hits",
                            "Prefix cache hits, in terms of number of cached tokens.", bm.prefix_hits)
        info = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                 labels=["block_size", "num_gpu_blocks", "enable_prefix_caching"])
        info.add_metric([str(bm.block_size), str(bm.num_blocks), str(bm.enable_prefix_caching)], 1)
        yield info
        yield self._histogram("vllm:time_to_first_token_seconds",
                              "Histogram of time to first token in seconds.", "ttft")
        yield self._histogram("vllm:inter_token_latency_seconds",
                              "Histogram of inter-token latency in seconds.", "itl")
        yield self._histogram("vllm:time_per_output_token_seconds",
                              "Histogram of time per output token in seconds. DEPRECATED: same data as "
                              "vllm:inter_token_latency_seconds.", "itl")
        yield self._histogram("vllm:e2e_request_latency_seconds",
                              "Histogram of e2e request latency in seconds.", "e2e")
        yield self._histogram("vllm:request_queue_time_seconds",
                              "Histogram of time spent in WAITING phase for request.", "queue")
        yield self._histogram("vllm:request_inference_time_seconds",
                              "Histogram of time spent in RUNNING phase for request.", "inference")
        yield self._histogram("vllm:request_prefill_time_seconds",
                              "Histogram of time spent in PREFILL phase for request.", "prefill")
        yield self._histogram("vllm:request_decode_time_seconds",
                              "Histogram of time spent in DECODE phase for request.", "decode")
        yield self._histogram("vllm:iteration_tokens_total",
                              "Histogram of number of tokens per engine_step.", "iteration_tokens")
        yield self._histogram("vllm:request_prompt_tokens", "Number of prefill tokens processed.",
                              "prompt_len")
        yield self._histogram("vllm:request_generation_tokens", "Number of generation tokens processed.",
                              "generation_len")

    def _engine_families(self, now: float) -> Iterable[Metric]:
        engine = self.async_engine.engine
        bm = engine.block_manager
        s = self.stats
        yield self._histogram("leanserve_batch_size", "Sequences per engine step.", "batch_size")
        window_ms = _batch_window_ms(engine.scheduler)
        yield self._gauge("leanserve_batch_window_seconds",
                          "How long the scheduler currently holds a batch open for more requests.",
                          window_ms / 1000.0)
        yield self._gauge("leanserve_kv_blocks", "KV-cache blocks in total.", bm.num_blocks)
        yield self._gauge("leanserve_kv_blocks_free",
                          "KV-cache blocks free (including cached prefixes that can be evicted).",
                          bm.num_free_blocks)
        yield self._histogram("leanserve_engine_step_seconds",
                              "Wall time of one engine step (schedule + forward + postprocess).",
                              "step_seconds")
        yield self._counter("leanserve_engine_busy_seconds", "Seconds the engine spent in steps.",
                            s.busy_seconds)
        yield self._gauge("leanserve_engine_idle_ratio",
                          f"Fraction of the last {IDLE_WINDOW_S:.0f} s the engine was not stepping.",
                          s.idle_fraction(now, self.started_at))
        yield self._histogram("leanserve_request_mean_nll",
                              "Minus the mean logprob of each completion's chosen tokens, in nats "
                              "(log-perplexity; a cheap quality signal).", "mean_nll")
        yield self._counter("leanserve_metrics_dropped_steps",
                            "Step records dropped because nothing drained them (metrics undercount).",
                            self.recorder.dropped)

    def _cost_families(self, now: float) -> Iterable[Metric]:
        uptime = now - self.started_at
        yield self._gauge("leanserve_cost_usd_per_hour", "Configured price of this server per hour.",
                          self.usd_per_hour)
        yield self._counter("leanserve_cost_usd", "Cost accrued since start at the configured price.",
                            cost.accrued_usd(self.usd_per_hour, uptime))
        requests, tokens = self.stats.finished_in_window()
        window_usd = cost.accrued_usd(self.usd_per_hour, min(self.cost_window_s, uptime))
        yield self._gauge("leanserve_cost_per_1k_requests_usd",
                          f"Cost per 1000 finished requests over the last {self.cost_window_s:.0f} s "
                          "(NaN when none finished).", cost.usd_per_1k_requests(window_usd, requests))
        yield self._gauge("leanserve_cost_per_1m_output_tokens_usd",
                          f"Cost per million generated tokens over the last {self.cost_window_s:.0f} s "
                          "(NaN when none).", cost.usd_per_1m_tokens(window_usd, tokens))

    def _gpu_families(self) -> Iterable[Metric]:
        samples = self.gpu.sample()
        if not samples:
            return
        util = GaugeMetricFamily("leanserve_gpu_utilization_ratio",
                                 "Fraction of the last sample period a kernel ran (NVML).", labels=["gpu"])
        used = GaugeMetricFamily("leanserve_gpu_memory_used_bytes", "GPU memory in use (NVML).",
                                 labels=["gpu"])
        total = GaugeMetricFamily("leanserve_gpu_memory_total_bytes", "GPU memory in total (NVML).",
                                  labels=["gpu"])
        power = GaugeMetricFamily("leanserve_gpu_power_watts", "GPU board power draw (NVML).",
                                  labels=["gpu"])
        for sample in samples:
            label = [str(sample.index)]
            util.add_metric(label, sample.utilization)
            used.add_metric(label, sample.memory_used_bytes)
            total.add_metric(label, sample.memory_total_bytes)
            if sample.power_watts is not None:
                power.add_metric(label, sample.power_watts)
        yield from (util, used, total, power)
