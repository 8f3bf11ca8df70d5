from __future__ import annotations

import threading

import pytest
import torch

from leanserve.engine import cpu_threads
from leanserve.engine.cpu_threads import OtherCpuLoad, ThreadTuner, run_on_own_thread


@pytest.fixture(autouse=True)
def restore_torch_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def scripted(tuner: ThreadTuner, times: dict[int, float]) -> None:
    tuner._probe = lambda n: times[n]  # type: ignore[method-assign]


def test_picks_fewer_threads_only_when_clearly_faster_and_rechecks_on_interval() -> None:
    tuner = ThreadTuner(max_threads=4, hidden_size=8, intermediate_size=16, interval_s=5.0)
    assert tuner.candidates == [1, 2, 4]
    scripted(tuner, {1: 10.0, 2: 70.0, 4: 70.0})
    assert tuner.maybe_retune(now=95.0) == 4 and not tuner.history  # the first call only starts the clock
    scripted(tuner, {1: 10.0, 2: 6.0, 4: 4.0})  # idle host: more threads win
    assert tuner.maybe_retune(now=100.0) == 4 and torch.get_num_threads() == 4
    scripted(tuner, {1: 10.0, 2: 70.0, 4: 70.0})  # busy neighbours: one thread wins
    assert tuner.maybe_retune(now=102.0) == 4  # not yet: the interval has not passed
    assert tuner.maybe_retune(now=105.5) == 1 and torch.get_num_threads() == 1
    scripted(tuner, {1: 10.0, 2: 11.0, 4: 11.5})  # within the margin: back to all threads...
    assert tuner.maybe_retune(now=111.0) == 1  # ...but only on the second such probe in a row
    assert tuner.maybe_retune(now=116.0) == 4
    scripted(tuner, {1: 10.0, 2: 5.0, 4: 30.0})  # one neighbour: half the threads win, at once
    assert tuner.maybe_retune(now=122.0) == 2
    assert [choice for _, _, choice in tuner.history] == [4, 1, 1, 4, 2]


def test_real_probe_runs_and_sets_threads() -> None:
    tuner = ThreadTuner(max_threads=2, hidden_size=64, intermediate_size=128, interval_s=0.0)
    assert tuner.maybe_retune() == 2 and not tuner.history  # starts the clock, all threads
    choice = tuner.maybe_retune()
    assert choice in (1, 2) and torch.get_num_threads() == choice
    assert set(tuner.history[-1][1]) == {1, 2} and all(t > 0 for t in tuner.history[-1][1].values())


def test_run_on_own_thread_returns_raises_and_leaves_no_thread_behind() -> None:
    seen = []

    def work(x: int) -> int:
        seen.append(threading.current_thread())
        return x * 2

    assert run_on_own_thread(work, 21) == 42
    assert seen[0] is not threading.current_thread() and not seen[0].is_alive()

    def fail() -> None:
        raise ValueError("bad checkpoint")

    with pytest.raises(ValueError, match="bad checkpoint"):
        run_on_own_thread(fail)


class ScriptedLoad:
    """Stands in for OtherCpuLoad: other processes' CPU use, in cores, as the test sets it."""

    def __init__(self, cpus: int) -> None:
        self.cpus = frozenset(range(cpus))
        self.others = 0.0

    def read(self, now: float) -> float:
        return self.others


def test_a_neighbour_arriving_or_leaving_moves_threads_at_once() -> None:
    load = ScriptedLoad(cpus=2)
    tuner = ThreadTuner(max_threads=2, hidden_size=8, intermediate_size=16, interval_s=5.0, load=load)  # type: ignore[arg-type]
    scripted(tuner, {1: 10.0, 2: 1.0})  # a probe that would always pick 2 threads
    assert tuner.maybe_retune(now=0.0) == 2  # starts the clock
    load.others = 0.1  # the client, say: our cores are free
    assert tuner.maybe_retune(now=0.3) == 2 and not tuner.history  # nothing changed, no probe
    load.others = 0.9  # a neighbour takes most of a core
    assert tuner.maybe_retune(now=0.6) == 1 and torch.get_num_threads() == 1  # at once, before the interval
    assert tuner.history[-1][1] == {}  # decided by the load: 2 threads are not even probed
    assert tuner.maybe_retune(now=6.0) == 1  # the interval's probe cannot read 2 threads as fast
    load.others = 0.1  # the neighbour leaves
    assert tuner.maybe_retune(now=6.3) == 2  # probed at once, and up without waiting a second probe
    scripted(tuner, {1: 1.0, 2: 10.0})  # our cores look free, yet a probe favours 1 thread...
    assert tuner.maybe_retune(now=11.5) == 2  # ...not on one probe
    assert tuner.maybe_retune(now=17.0) == 1  # on the second in a row
    assert [choice for _, _, choice in tuner.history] == [1, 1, 2, 2, 1]


def test_thread_cap_leaves_the_neighbours_share_of_our_cores() -> None:
    load = ScriptedLoad(cpus=8)
    tuner = ThreadTuner(max_threads=4, hidden_size=8, intermediate_size=16, load=load)  # type: ignore[arg-type]
    for others, cap in ((1.0, 4), (4.4, 4), (4.6, 3), (6.0, 2), (7.9, 1)):
        load.others = others
        tuner._load_checked = -1.0
        tuner._load_changed(now=float(others))
        assert tuner._thread_cap() == cap, others


def test_a_failed_reading_is_skipped_and_the_next_spans_the_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([10.0, None, 11.5])  # busy seconds of our CPUs; None: /proc/stat unreadable
    monkeypatch.setattr(cpu_threads, "_busy_seconds", lambda cpus: next(readings))
    monkeypatch.setattr(cpu_threads.os, "times", lambda: type("T", (), {"user": 1.0, "system": 0.0})())
    load = OtherCpuLoad(frozenset({0, 1}))
    assert load.read(now=0.0) is None  # the first reading only starts the clock
    assert load.read(now=1.0) is None  # unreadable: no figure, and no bogus zero remembered
    assert load.read(now=2.0) == 0.75  # 1.5 busy seconds over the 2 s since the last good reading
