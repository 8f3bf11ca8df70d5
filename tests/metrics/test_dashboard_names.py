"""Every metric the Grafana dashboard and the alert rules query exists in a live /metrics scrape."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import yaml

from tests.metrics.metrics_harness import scrape

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
ALERTS = ROOT / "deploy/prometheus/alerts.yml"

KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
            "offset", "bool", "inf", "nan"}
IDENTIFIER = re.compile(r"(?<![\w.:$])([a-zA-Z_:][a-zA-Z0-9_:]*)(?![\w:]|\s*\()")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (a regex, not a parser: enough for our expressions)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors and subqueries
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\$\w+", "", text)  # Grafana variables
    return {m for m in IDENTIFIER.findall(text) if m.lower() not in KEYWORDS}


def dashboard_exprs(path: Path) -> Iterator[str]:
    dash = json.loads(path.read_text())

    def panels(items: list[dict]) -> Iterator[dict]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))

    for panel in panels(dash["panels"]):
        for target in panel.get("targets", []):
            yield target["expr"]
    for var in dash.get("templating", {}).get("list", []):
        query = var.get("query")
        if isinstance(query, dict):
            query = query.get("query", "")
        match = re.match(r"label_values\(\s*([^,)]+)", query or "")
        if match:
            yield match.group(1)


def alert_exprs() -> Iterator[str]:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            yield rule["expr"]


def test_metric_name_extraction() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, model_name) (rate(vllm:ttft_bucket{model_name=~"$model"}'
            '[$__rate_interval]))) > 1 and on (instance) up offset 5m unless foo_total / bar')
    assert metric_names(expr) == {"vllm:ttft_bucket", "up", "foo_total", "bar"}


def test_dashboard_and_alert_metrics_exist_in_live_scrape(live_server) -> None:
    assert DASHBOARDS, "no dashboard JSON under deploy/grafana/dashboards"
    exposed = scrape(live_server.url).sample_names | {"up"}
    wanted: dict[str, set[str]] = {}
    for path in DASHBOARDS:
        for expr in dashboard_exprs(path):
            for name in metric_names(expr):
                wanted.setdefault(name, set()).add(path.name)
    for expr in alert_exprs():
        for name in metric_names(expr):
            wanted.setdefault(name, set()).add(ALERTS.name)
    assert len(wanted) >= 15, sorted(wanted)  # the extraction found the queries at all
    missing = {name: sorted(where) for name, where in wanted.items() if name not in exposed}
    assert not missing, f"queried but not exposed by /metrics: {missing}"
