from __future__ import annotations

import time

from leanserve.engine.batch_window import BatchWindow, BatchWindowConfig
from leanserve.engine.block_manager import BlockManager
from leanserve.engine.scheduler import Scheduler, SchedulerConfig
from leanserve.engine.sequence import Sequence
from leanserve.sampling_params import SamplingParams


def feed(window: BatchWindow, rate: float, seconds: float) -> float:
    t = 0.0
    while t < seconds:
        window.observe_arrival(t)
        t += 1.0 / rate
    return t


def test_low_traffic_gets_no_window() -> None:
    window = BatchWindow(BatchWindowConfig(max_batch_wait_ms=20))
    now = feed(window, rate=0.5, seconds=60)
    assert abs(window.arrival_rate(now) - 0.5) < 0.2
    assert window.window_s(now, running_fraction=0.0) == 0.0
    assert window.hold_seconds(now, now, 0.0, queue_fills_step=False) == 0.0


def test_window_widens_with_rate_and_occupancy_up_to_the_maximum() -> None:
    windows = []
    for rate in (10, 25, 50, 200):
        window = BatchWindow(BatchWindowConfig(max_batch_wait_ms=20))
        now = feed(window, rate=rate, seconds=20)
        windows.append(window.window_s(now, running_fraction=0.0))
    assert windows == sorted(windows) and windows[0] > 0 and abs(windows[-1] - 0.020) < 1e-9
    quiet = BatchWindow(BatchWindowConfig(max_batch_wait_ms=20))
    assert quiet.window_s(0.0, running_fraction=0.5) == 0.010


def test_fixed_window_and_disabled_window() -> None:
    fixed = BatchWindow(BatchWindowConfig(max_batch_wait_ms=20, adaptive=False))
    assert fixed.window_s(0.0, 0.0) == 0.020
    hold = fixed.hold_seconds(now=1.005, oldest_arrival=1.0, running_fraction=0.0, queue_fills_step=False)
    assert abs(hold - 0.015) < 1e-9
    assert fixed.hold_seconds(now=1.005, oldest_arrival=1.0, running_fraction=0.0, queue_fills_step=True) == 0.0
    off = BatchWindow(BatchWindowConfig(max_batch_wait_ms=0, adaptive=False))
    assert off.window_s(0.0, 1.0) == 0.0


def make(policy: str = "continuous", **window) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, policy=policy, window=BatchWindowConfig(**window))
    return Scheduler(config, BlockManager(64, 4, False))


def seq(rid: str, n: int = 3) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), SamplingParams())


def test_scheduler_holds_new_requests_for_the_fixed_window_then_admits_together() -> None:
    sched = make(max_batch_wait_ms=30, adaptive=False)
    sched.add(seq("a"))
    assert not sched.schedule() and sched.admission_hold_s > 0
    sched.add(seq("b"))
    time.sleep(0.035)
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a", "b"]


def test_static_batching_admits_only_after_the_batch_finishes() -> None:
    sched = make(policy="static", max_batch_wait_ms=0)
    a = seq("a")
    sched.add(a)
    sched.schedule()
    sched.add(seq("b"))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["a"]  # b waits although there is room
    sched.remove(a)
    assert [s.request_id for s in sched.schedule().seqs] == ["b"]
