from __future__ import annotations

import torch

from leanserve.engine.cpu_threads import ThreadTuner


def scripted(tuner: ThreadTuner, times: dict[int, float]) -> None:
    tuner._probe = lambda n: times[n]  # type: ignore[method-assign]


def test_picks_fewer_threads_only_when_clearly_faster_and_rechecks_on_interval() -> None:
    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(max_threads=4, hidden_size=8, intermediate_size=16, interval_s=5.0)
        assert tuner.candidates == [1, 2, 4]
        scripted(tuner, {1: 10.0, 2: 6.0, 4: 4.0})  # idle host: more threads win
        assert tuner.maybe_retune(now=100.0) == 4 and torch.get_num_threads() == 4
        scripted(tuner, {1: 10.0, 2: 70.0, 4: 70.0})  # busy neighbours: one thread wins
        assert tuner.maybe_retune(now=102.0) == 4  # not yet: the interval has not passed
        assert tuner.maybe_retune(now=105.5) == 1 and torch.get_num_threads() == 1
        scripted(tuner, {1: 10.0, 2: 11.0, 4: 11.5})  # within the margin: back to all threads
        assert tuner.maybe_retune(now=111.0) == 4
        scripted(tuner, {1: 10.0, 2: 5.0, 4: 30.0})  # one neighbour: half the threads win
        assert tuner.maybe_retune(now=117.0) == 2
        assert [choice for _, _, choice in tuner.history] == [4, 1, 4, 2]
    finally:
        torch.set_num_threads(before)


def test_real_probe_runs_and_sets_threads() -> None:
    before = torch.get_num_threads()
    try:
        tuner = ThreadTuner(max_threads=2, hidden_size=64, intermediate_size=128, interval_s=0.0)
        choice = tuner.maybe_retune()
        assert choice in (1, 2) and torch.get_num_threads() == choice
        assert set(tuner.history[-1][1]) == {1, 2} and all(t > 0 for t in tuner.history[-1][1].values())
    finally:
        torch.set_num_threads(before)
