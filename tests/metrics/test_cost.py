"""Cost arithmetic (shared by /metrics and the CLI) and `leanserve cost`."""

from __future__ import annotations

import argparse
import io
import json
import math

import pytest

from leanserve.metrics import cost
from leanserve.metrics.cost_cli import add_cost_subcommand, build_report, read_bench, run_cost


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_cost_subcommand(parser.add_subparsers())
    return parser.parse_args(["cost", *argv])


def test_hourly_price_gpu_and_cpu() -> None:
    assert cost.hourly_price("cuda", 2.5, 4) == 10.0
    assert cost.hourly_price("cpu", 0.3, 4) == 0.3  # the host's price; GPUs do not count
    assert cost.hourly_price("cpu", 2.0, 1, usd_per_host_hour=0.1) == 0.1
    assert cost.accrued_usd(3.6, 100) == pytest.approx(0.1)
    assert math.isnan(cost.usd_per_1k_requests(1.0, 0))
    assert cost.usd_per_1m_tokens(2.0, 1_000_000) == 2.0


def test_plan_fleet_rounds_replicas_up_at_the_target_utilization() -> None:
    tp = cost.Throughput(output_tok_s=1000.0, req_s=10.0)  # 100 tokens per request
    # 1e6 req/day * 100 tok = 1e8 tok/day = 1157.4 tok/s; at 70% of 1000 tok/s -> 1.65 -> 2 replicas.
    plan = cost.plan_fleet(tp, cost.Traffic(requests_per_day=1e6), usd_per_gpu_hour=2.0)
    assert plan.replicas == 2 and plan.gpus == 2
    assert plan.usd_per_day == pytest.approx(96.0)
    assert plan.usd_per_1k_requests == pytest.approx(0.096)
    assert plan.usd_per_1m_tokens == pytest.approx(0.96)
    assert plan.utilization == pytest.approx(1e8 / 86400 / 2000)
    two_gpu = cost.plan_fleet(cost.Throughput(1000.0, 10.0, gpus_per_replica=2), cost.Traffic(1e6), 2.0)
    assert two_gpu.gpus == 4 and two_gpu.usd_per_day == pytest.approx(192.0)
    with pytest.raises(ValueError):
        cost.plan_fleet(tp, cost.Traffic(), 2.0)


def test_savings_are_cumulative_and_flag_a_mismatch() -> None:
    levers = [cost.Lever("a", 2.0, ""), cost.Lever("b", 2.0, "")]
    base = cost.Throughput(100.0, 1.0)
    table = cost.savings_table(base, cost.Traffic(output_tokens_per_day=86400 * 700), 1.0, levers,
                               target_utilization=1.0, measured=cost.Throughput(200.0, 2.0))
    assert [r.gpus for r in table.rows] == [7, 4, 2, 4]
    assert [r.label for r in table.rows][-1] == "measured (benchmark)"
    assert table.rows[2].saving_vs_baseline == pytest.approx(1 - 2 / 7)
    assert table.notes and "adjust" in table.notes[0]  # predicted 400 tok/s, measured 200


def test_read_bench_takes_the_last_json_line() -> None:
    text = "concurrency=8: 20/20 ok\n{\"req_s\": 1}\nnoise\n{\"req_s\": 12.5, \"output_tok_s\": 1600}\n"
    assert read_bench("-", io.StringIO(text)) == {"req_s": 12.5, "output_tok_s": 1600}
    with pytest.raises(ValueError):
        read_bench("-", io.StringIO("no json here"))


def test_report_from_benchmark(tmp_path) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text('table line\n{"req_s": 12.5, "output_tok_s": 1600.0, "ttft_p50_ms": 80}\n')
    report = build_report(parse("--bench", str(bench), "--usd-per-gpu-hour", "2.5",
                                 "--requests-per-day", "2e6"))
    plan = report["plan"]
    # 128 tokens/request * 2e6 = 2.56e8 tok/day = 2963 tok/s; / (1600 * 0.7) -> 3 GPUs.
    assert plan["gpus"] == 3 and plan["usd_per_day"] == pytest.approx(180.0)
    assert plan["usd_per_1k_requests"] == pytest.approx(0.09)
    assert plan["usd_per_1m_tokens"] == pytest.approx(180 / 256)
    rows = report["savings"]
    assert [r["label"] for r in rows][0] == "baseline" and len(rows) == 5
    assert rows[-1]["tok_s_per_gpu"] == pytest.approx(1600.0)  # derived baseline * gains = measured
    assert all(r["assumed"] for r in rows)
    assert not any("GPU-hour" in a or "requests/day" in a for a in report["assumptions"])


def test_report_with_measured_baseline_and_json_output(tmp_path, capsys) -> None:
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps({"req_s": 10.0, "output_tok_s": 1000.0}))
    base = tmp_path / "base.json"
    base.write_text(json.dumps({"req_s": 0.5, "output_tok_s": 50.0}))
    args = parse("--bench", str(bench), "--baseline-bench", str(base), "--batching-gain", "10",
                 "--kv-cache-gain", "1", "--int4-gain", "2", "--scheduling-gain", "1", "--json")
    assert run_cost(args) == 0
    report = json.loads(capsys.readouterr().out)
    rows = report["savings"]
    assert rows[0]["assumed"] is False and rows[-1]["label"] == "measured (benchmark)"
    assert rows[-2]["tok_s_per_gpu"] == pytest.approx(1000.0)  # 50 * 10 * 1 * 2 * 1
    assert not report["notes"]  # the assumed gains explain the measurement
    assert any("$2.00 per GPU-hour" in a for a in report["assumptions"])


def test_cli_errors_and_text_report(capsys) -> None:
    assert run_cost(parse()) == 2
    assert "--throughput" in capsys.readouterr().err
    assert run_cost(parse("--throughput", "500")) == 0
    out = capsys.readouterr().out
    for needle in ("GPU(s)", "/day", "per 1K requests", "per 1M output tokens", "continuous batching",
                   "INT4 weights", "smart scheduling", "paged KV cache", "Assumptions", "200 output tokens"):
        assert needle in out, needle


def test_registered_in_the_main_cli() -> None:
    cli = pytest.importorskip("leanserve.cli")
    args = cli.build_parser().parse_args(["cost", "--throughput", "100"])
    assert args.func is run_cost


# ---- nonsense in, an error out (never NaN or negative dollars) ------------------------------------
NONSENSE = [
    ("--usd-per-gpu-hour", "-1"), ("--usd-per-gpu-hour", "nan"), ("--usd-per-gpu-hour", "0"),
    ("--requests-per-day", "0"), ("--requests-per-day", "-100"), ("--output-tokens-per-day", "inf"),
    ("--output-tokens-per-request", "-5"), ("--output-tokens-per-request", "0"), ("--req-s", "-1"),
    ("--throughput", "inf"), ("--throughput", "nan"), ("--gpus-per-replica", "0"),
    ("--batching-gain", "0"), ("--int4-gain", "nan"), ("--target-utilization", "1.5"),
    ("--baseline-throughput", "-3"),
]


def test_flags_refuse_nonsense_with_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    for flag, value in NONSENSE:
        argv = [flag, value] if flag == "--throughput" else ["--throughput", "500", flag, value]
        with pytest.raises(SystemExit) as exit_info:
            parse(*argv)
        assert exit_info.value.code == 2, (flag, value)
        assert f"argument {flag}:" in capsys.readouterr().err, (flag, value)


@pytest.mark.parametrize(("fields", "needle"), [
    ({"output_tok_s": math.nan, "req_s": 1.0}, "output_tok_s must be a finite number greater than 0"),
    ({"output_tok_s": 100.0, "req_s": -1.0}, "req_s must be a finite number greater than 0"),
    ({"output_tok_s": 100.0, "num_gpus": 0}, "num_gpus must be a whole number greater than 0"),
])
def test_benchmark_fields_are_checked_like_flags(fields: dict, needle: str, tmp_path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps(fields))  # json writes NaN, and json.loads reads it back
    assert run_cost(parse("--bench", str(bench))) == 2
    err = capsys.readouterr().err
    assert needle in err and str(bench) in err


def test_json_output_is_strict_json(capsys: pytest.CaptureFixture[str]) -> None:
    def strict(text: str) -> dict:
        return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in the JSON output"))

    assert run_cost(parse("--throughput", "500", "--json")) == 0
    report = strict(capsys.readouterr().out)
    assert report["plan"]["usd_per_1k_requests"] > 0
    # Zero traffic used to print NaN per 1K requests with status 0.
    with pytest.raises(SystemExit):
        parse("--throughput", "500", "--requests-per-day", "0", "--json")


def test_both_traffic_figures_give_the_tokens_per_request() -> None:
    # 1e9 tokens over 1e6 requests is 1000 tokens a request, not the assumed 200.
    report = build_report(parse("--throughput", "500", "--requests-per-day", "1e6",
                                "--output-tokens-per-day", "1e9"))
    assert report["throughput"]["req_s"] == pytest.approx(0.5)
    assert not any("tokens per request" in a for a in report["assumptions"])
    plan = report["plan"]
    assert (plan["requests_per_day"], plan["output_tokens_per_day"]) == (1e6, 1e9)
    with pytest.raises(ValueError, match="at most two of"):
        build_report(parse("--throughput", "500", "--requests-per-day", "1e6", "--output-tokens-per-day", "1e9",
                           "--output-tokens-per-request", "300"))
    # A measured ratio still counts when the traffic gives only one figure.
    report = build_report(parse("--throughput", "500", "--req-s", "2", "--output-tokens-per-day", "1e9"))
    assert report["plan"]["requests_per_day"] == pytest.approx(1e9 / 250)


def test_plan_fleet_refuses_inputs_with_no_meaningful_plan() -> None:
    tp = cost.Throughput(1000.0, 10.0)
    traffic = cost.Traffic(requests_per_day=1e6)
    for bad in (
        lambda: cost.plan_fleet(tp, traffic, usd_per_gpu_hour=math.nan),
        lambda: cost.plan_fleet(tp, traffic, usd_per_gpu_hour=-1.0),
        lambda: cost.plan_fleet(cost.Throughput(math.inf, 10.0), traffic, 2.0),
        lambda: cost.plan_fleet(cost.Throughput(1000.0, 10.0, gpus_per_replica=0), traffic, 2.0),
        lambda: cost.plan_fleet(tp, cost.Traffic(requests_per_day=0.0), 2.0),
        lambda: cost.plan_fleet(tp, cost.Traffic(output_tokens_per_day=-5.0), 2.0),
    ):
        with pytest.raises(ValueError):
            bad()
    # A free host is a plan (nothing costs anything, so nothing is saved), not a division by zero.
    table = cost.savings_table(tp, traffic, 0.0, [cost.Lever("a", 2.0, "")])
    assert [row.saving_vs_baseline for row in table.rows] == [0.0, 0.0]
