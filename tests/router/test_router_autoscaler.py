from __future__ import annotations

import pytest

from leanserve.router.autoscaler import Autoscaler, AutoscalerConfig, FleetMetrics, ScheduledPeak


def cfg(**kw) -> AutoscalerConfig:
    base = dict(min_replicas=1, max_replicas=10, replica_concurrency=10, target_utilisation=0.5,
                up_cooldown_s=30, down_cooldown_s=120, down_window_s=120)
    base.update(kw)
    return AutoscalerConfig(**base)


def calm(t: float, replicas: int, running: float = 1.0) -> FleetMetrics:
    return FleetMetrics(t=t, replicas=replicas, queue_depth=0, running=running, ttft_p95_s=0.1,
                        e2e_p95_s=1.0, kv_usage=0.1, utilisation=running / (10 * replicas))


def busy(t: float, replicas: int, queue: float, running: float) -> FleetMetrics:
    return FleetMetrics(t=t, replicas=replicas, queue_depth=queue, running=running, ttft_p95_s=0.9,
                        e2e_p95_s=9.0, kv_usage=0.8, utilisation=min(1.0, running / (10 * replicas)))


def run(a: Autoscaler, samples: list[FleetMetrics]) -> list[int]:
    return [a.observe(m) for m in samples]


def test_scale_up_sized_from_demand_and_bounded():
    a = Autoscaler(cfg())
    # 20 running + 25 waiting on one replica; each replica should carry 10 * 0.5 = 5.
    assert a.observe(busy(0, 1, queue=25, running=20)) == 5  # capped at +4 per step
    assert a.last_reason == "up:queue"
    a2 = Autoscaler(cfg(max_replicas=3))
    assert a2.observe(busy(0, 1, queue=100, running=10)) == 3


def test_up_cooldown_and_no_stacking_while_replicas_start():
    a = Autoscaler(cfg(settle_s=60))
    # Latency is high but there is no queue to size from: a blind +1, once the fleet has been
    # steady for the settle time ...
    hot = lambda t, n: FleetMetrics(t=t, replicas=n, queue_depth=0, running=2, ttft_p95_s=2.0)
    assert run(a, [hot(t, 1) for t in (0, 30, 60)]) == [1, 1, 2]
    # ... and not another while the second replica is still cold-starting, however long it takes.
    assert run(a, [hot(t, 1) for t in range(65, 400, 5)]) == [2] * 67
    # Once it is ready, the next +1 waits until its effect can show in the latency window.
    assert run(a, [hot(t, 2) for t in (400, 430, 459, 460)]) == [2, 2, 2, 3]
    # The up cooldown holds even when settled.
    b = Autoscaler(cfg(settle_s=0, up_cooldown_s=30))
    assert run(b, [hot(t, 1) for t in (0,)] + [hot(t, 2) for t in (10, 29, 30)]) == [2, 2, 2, 3]


def test_scale_down_waits_for_a_calm_window_and_steps_by_one():
    a = Autoscaler(cfg(), initial=6)
    samples = [calm(t, 6) for t in range(0, 1200, 10)]
    out = run(a, samples)
    changes = [(samples[i].t, n) for i, n in enumerate(out) if i and n != out[i - 1]]
    assert out[0] == 6 and changes[0][0] >= 120  # a full calm window first
    assert [n for _, n in changes] == [4, 2, 1]  # at most max_step_down=2 at a time
    gaps = [b[0] - a_[0] for a_, b in zip(changes, changes[1:], strict=False)]
    assert min(gaps) >= 120  # down cooldown between steps


def test_scale_down_keeps_capacity_for_the_windows_peak():
    a = Autoscaler(cfg(noise_headroom=0), initial=6)
    # Mostly 5 running, but a spike to 18 every 100 s, so one is always in the window: 18 / 5 per
    # replica -> keep 4.
    samples = [calm(t, 6, running=18 if t % 100 == 50 else 5) for t in range(0, 1000, 10)]
    assert min(run(a, samples)) == 4


def test_square_root_staffing_pads_small_fleets_more():
    a = Autoscaler(cfg(noise_headroom=1.0))  # 5 requests per replica at target
    assert a.needed(4) == 2  # 4 + 2 = 6 -> 2 replicas, where the mean alone says 1
    assert a.needed(400) == 84  # 400 + 20 -> 84: 5% over the mean's 80
    assert Autoscaler(cfg(noise_headroom=0)).needed(400) == 80


def test_flap_guard_holds_the_size_that_proved_too_small():
    a = Autoscaler(cfg(settle_s=0, flap_window_s=3600, flap_hold_s=1800), initial=2)
    # Two replicas are calm, one is not (the load per replica grows when the fleet shrinks).
    seq: list[int] = []
    t = 0
    for _ in range(60):  # ten hours of 10-minute cycles
        n = a.desired
        m = calm(t, 2, running=2) if n >= 2 else FleetMetrics(t=t, replicas=1, queue_depth=0, running=8,
                                                                 ttft_p95_s=0.95)
        seq.append(a.observe(m))
        t += 600
    # Each retry of the too-small size comes later than the last: holds of 1800, 3600, 7200 s, capped.
    retries = [i for i in range(1, len(seq)) if seq[i] == 1 and seq[i - 1] > 1]
    gaps = [b - a_ for a_, b in zip(retries, retries[1:], strict=False)]
    assert gaps == sorted(gaps) and gaps[0] < gaps[-1] and gaps[-1] * 600 >= 7200
    assert seq.count(1) <= 6  # ten hours, at most an hour of it on the size that proved too small


def test_no_flapping_on_noisy_load_between_thresholds():
    a = Autoscaler(cfg(), initial=3)
    # Utilisation wanders 0.45..0.75: above the down threshold, below the up one. Never change.
    samples = [FleetMetrics(t=t, replicas=3, queue_depth=0, running=13.5 + 9 * ((t // 10) % 2),
                            ttft_p95_s=0.5, e2e_p95_s=5.0, utilisation=0.45 + 0.3 * ((t // 10) % 2))
               for t in range(0, 3600, 10)]
    assert set(run(a, samples)) == {3}


def test_burst_then_quiet_goes_up_fast_and_down_slowly_without_oscillation():
    a = Autoscaler(cfg())
    samples = [calm(t, 1) for t in range(0, 300, 10)]
    samples += [busy(t, a_n, queue=30, running=20) for t, a_n in zip(range(300, 420, 10), [1] * 3 + [5] * 9,
                                                                      strict=True)]
    samples += [calm(t, 5) for t in range(420, 2400, 10)]
    out = run(a, samples)
    assert max(out) >= 5 and out[-1] == 1
    direction_changes = sum(
        1 for x, y, z in zip(out, out[1:], out[2:], strict=False) if (y - x) * (z - y) < 0
    )
    assert direction_changes == 0  # a single rise then a monotone fall


def test_pre_scale_fires_lead_time_before_a_known_peak():
    peak = ScheduledPeak(start_s=9 * 3600, end_s=12 * 3600, replicas=4, lead_s=900)
    a = Autoscaler(cfg(schedule=(peak,)))
    day = 3 * 86400  # any day: the schedule is by time of day
    assert a.observe(calm(day + 8 * 3600, 1)) == 1
    assert a.observe(calm(day + 8 * 3600 + 44 * 60, 1)) == 1
    assert a.observe(calm(day + 8 * 3600 + 45 * 60, 1)) == 4  # 08:45 = 15 min early
    assert a.last_reason == "floor:schedule"
    assert a.observe(calm(day + 11 * 3600, 4)) == 4  # calm, but the floor holds through the peak
    out = run(a, [calm(day + 12 * 3600 + s, 4) for s in range(0, 1200, 10)])
    assert out[-1] < 4  # released after the window, gradually


def test_schedule_window_wraps_midnight():
    p = ScheduledPeak(start_s=23.5 * 3600, end_s=1 * 3600, replicas=3, lead_s=1800)
    assert p.active(23 * 3600) and p.active(0.5 * 3600) and not p.active(2 * 3600)
    assert not p.active(22.9 * 3600)


def test_warm_pool_floor_and_config_validation():
    a = Autoscaler(cfg(min_replicas=2), initial=2)
    assert set(run(a, [calm(t, 2, running=0) for t in range(0, 2000, 10)])) == {2}
    with pytest.raises(ValueError):
        cfg(down_utilisation=0.9)  # down above up: no hysteresis
    with pytest.raises(ValueError):
        cfg(min_replicas=5, max_replicas=3)
