"""The PodMonitor that feeds KEDA. kubernetes-validate has no schema for the Operator's CRDs, so its shape
and its contract with the Deployments and the ScaledObject's queries are checked here.
"""

from __future__ import annotations

import copy
import re
from typing import Any

from tests.deploy.conftest import ROOT
from tests.deploy.containers import k8s_by_kind

# What the Prometheus Operator puts on every series a PodMonitor scrapes; pod labels only arrive
# through podTargetLabels.
OPERATOR_TARGET_LABELS = {"namespace", "pod", "container", "endpoint", "job", "instance"}
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"([^"]*)"')


def metric_labels() -> set[str]:
    """Labels leanserve's own families carry (model_name, ...), plus histograms' `le`."""
    names = {"le"}
    for source in (ROOT / "src/leanserve/metrics").glob("*.py"):
        for group in re.findall(r"labels=\[([^\]]*)\]", source.read_text()):
            names |= set(re.findall(r'"([a-zA-Z_][a-zA-Z0-9_]*)"', group))
    return names


def sanitized(label: str) -> str:
    """A Kubernetes label as the Operator names it on a series."""
    return re.sub(r"[^a-zA-Z0-9_]", "_", label)


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "matchExpressions are not modelled here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def seconds(duration: str) -> float:
    value, unit = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m)", duration).groups()
    return float(value) * (60 if unit == "m" else 1)


def contract_problems(monitor: dict[str, Any], scaled: dict[str, Any], deployments: dict[str, Any]) -> list[str]:
    """Why KEDA's queries would find nothing for its target; empty when the wiring holds."""
    problems = []
    target = deployments[scaled["spec"]["scaleTargetRef"]["name"]]
    pod_labels = target["spec"]["template"]["metadata"]["labels"]
    if not selects(monitor["spec"]["selector"], pod_labels):
        problems.append(f"the PodMonitor does not select {target['metadata']['name']}'s pods")
    copied = {sanitized(label): label for label in monitor["spec"].get("podTargetLabels", [])}
    present = OPERATOR_TARGET_LABELS | metric_labels() | set(copied)
    for trigger in scaled["spec"]["triggers"]:
        if trigger["type"] != "prometheus":
            continue
        for block in re.findall(r"\{([^}]*)\}", trigger["metadata"]["query"]):
            for name, op, value in MATCHER.findall(block):
                if name not in present:
                    problems.append(f"{trigger['name']}: no scraped series carries {name}")
                elif name in copied and op == "=" and pod_labels.get(copied[name]) != value:
                    problems.append(f"{trigger['name']}: {name}={value!r}, but the target's pods have "
                                    f"{copied[name]}={pod_labels.get(copied[name])!r}")
    return problems


def the_podmonitor() -> dict[str, Any]:
    monitors = k8s_by_kind("PodMonitor")
    assert len(monitors) == 1, f"expected one PodMonitor in kustomization.yaml, found {sorted(monitors)}"
    return next(iter(monitors.values()))


def test_podmonitor_shape() -> None:
    monitor = the_podmonitor()
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["app.kubernetes.io/name"] == "leanserve"
    assert monitor["spec"]["podMetricsEndpoints"], "no endpoints to scrape"


def test_podmonitor_endpoints_are_named_ports_serving_metrics() -> None:
    monitor = the_podmonitor()
    selected = {name: dep for name, dep in k8s_by_kind("Deployment").items()
                if selects(monitor["spec"]["selector"], dep["spec"]["template"]["metadata"]["labels"])}
    assert "leanserve-replica" in selected
    for name, dep in selected.items():
        ports = {p.get("name") for c in dep["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for endpoint in monitor["spec"]["podMetricsEndpoints"]:
            assert endpoint["port"] in ports, f"{name} has no container port named {endpoint['port']}"
            assert endpoint.get("path", "/metrics") == "/metrics"


def test_keda_queries_find_the_series_the_podmonitor_produces() -> None:
    deployments = k8s_by_kind("Deployment")
    (scaled,) = k8s_by_kind("ScaledObject").values()
    assert not contract_problems(the_podmonitor(), scaled, deployments)


def test_contract_check_has_teeth() -> None:
    deployments = k8s_by_kind("Deployment")
    (scaled,) = k8s_by_kind("ScaledObject").values()
    monitor = copy.deepcopy(the_podmonitor())
    monitor["spec"].pop("podTargetLabels")  # pod labels are then on no series
    assert any("app_kubernetes_io_component" in p for p in contract_problems(monitor, scaled, deployments))
    monitor = copy.deepcopy(the_podmonitor())
    monitor["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/component": "router"}}
    assert any("does not select" in p for p in contract_problems(monitor, scaled, deployments))


def test_scrapes_at_least_as_often_as_keda_polls() -> None:
    (scaled,) = k8s_by_kind("ScaledObject").values()
    for endpoint in the_podmonitor()["spec"]["podMetricsEndpoints"]:
        assert "interval" in endpoint, "the Prometheus default (often 30 s) would lag KEDA's polls"
        assert seconds(endpoint["interval"]) <= scaled["spec"]["pollingInterval"]
