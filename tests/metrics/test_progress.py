"""Startup summary and the periodic progress line."""

from __future__ import annotations

import logging
import time

import pytest

from leanserve.metrics.collector import EngineCollector
from leanserve.metrics.gpu import GpuSampler
from leanserve.metrics.progress import ProgressReporter, log_startup
from tests.metrics.metrics_harness import Clock, fake_engine, one_request, settings_for_test


def test_log_startup_reports_capacity(live_server, caplog: pytest.LogCaptureFixture) -> None:
    engine = live_server.async_engine.engine
    with caplog.at_level(logging.INFO, logger="leanserve.progress"):
        summary = log_startup(live_server.async_engine, settings_for_test())
    bm = engine.block_manager
    assert summary.kv_blocks == bm.num_blocks and summary.kv_tokens == bm.num_blocks * bm.block_size
    assert summary.max_concurrency_at_full_context == pytest.approx(summary.kv_tokens / engine.max_model_len)
    assert summary.kv_bytes == engine.config.kv_cache_memory  # the test config gives KV 2 MiB exactly
    assert summary.weight_bytes == engine.weight_bytes > 0
    assert summary.config["max_num_seqs"] == engine.config.max_num_seqs
    text = caplog.text
    for needle in ("device: cpu", "weights", f"{bm.num_blocks} blocks", "max concurrency", "tiny-llama",
                   "max_num_seqs=4"):
        assert needle in text, needle


def test_progress_line_while_busy_and_quiet_when_idle(caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    collector = EngineCollector(fake_engine(), settings_for_test(), GpuSampler(nvml=None), clock=clock)
    reporter = ProgressReporter(collector, interval=5.0, clock=clock)
    one_request(collector)
    clock.now = 2.0
    with caplog.at_level(logging.INFO, logger="leanserve.progress"):
        line = reporter.tick()
    assert line == ("running: 2 reqs, waiting: 1 reqs, KV cache: 25.0%, "
                    "prompt: 5.0 tok/s, generation: 1.5 tok/s")
    assert line in caplog.text
    engine = collector.async_engine.engine
    engine.num_running = engine.num_waiting = 0
    clock.now = 7.0
    assert reporter.tick() is None  # nothing ran, nothing queued: no line


def test_reporter_thread_starts_and_stops() -> None:
    collector = EngineCollector(fake_engine(), settings_for_test(), GpuSampler(nvml=None), clock=Clock())
    reporter = ProgressReporter(collector, interval=0.01)
    one_request(collector)
    reporter.start()
    reporter.start()  # idempotent
    deadline = time.monotonic() + 5
    while collector.recorder.pending and time.monotonic() < deadline:
        time.sleep(0.01)
    reporter.stop()
    assert not collector.recorder.pending  # the reporter drained the records
