"""Static checks of deploy/k8s: schema validation where the schemas are installed, structure always."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
KNOWN = {
    ("apps/v1", "Deployment"), ("v1", "Service"), ("v1", "PersistentVolumeClaim"),
    ("policy/v1", "PodDisruptionBudget"), ("keda.sh/v1alpha1", "ScaledObject"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
}


def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def by_kind(kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for _, d in documents() if d["kind"] == kind}


def matches(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_every_manifest_is_a_known_kind_with_name_and_labels():
    docs = documents()
    assert docs
    for name, d in docs:
        assert (d.get("apiVersion"), d.get("kind")) in KNOWN, name
        assert d["metadata"]["name"] and d["metadata"]["labels"]["app.kubernetes.io/name"] == "leanserve"


def test_kustomization_lists_every_file():
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def test_against_kubernetes_json_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate for schemas")
    version = kv.latest_version()
    checked = 0
    for _, d in documents():
        if d["apiVersion"].startswith(("keda.sh/", "monitoring.coreos.com/")):
            continue  # CRDs: no core schema; checked structurally (here, tests/deploy/test_k8s_monitoring.py)
        kv.validate(d, version, strict=True)  # raises ValidationError with the path on a bad field
        checked += 1
    assert checked >= 6


def test_selectors_match_pod_templates_and_services_find_pods():
    deployments = by_kind("Deployment")
    for name, dep in deployments.items():
        selector = dep["spec"]["selector"]["matchLabels"]
        assert matches(selector, dep["spec"]["template"]["metadata"]["labels"]), name
    pods = [dep["spec"]["template"]["metadata"]["labels"] for dep in deployments.values()]
    for name, svc in by_kind("Service").items():
        targets = [p for p in pods if matches(svc["spec"]["selector"], p)]
        assert len(targets) == 1, f"Service {name} should select exactly one Deployment's pods"
    for name, pdb in by_kind("PodDisruptionBudget").items():
        assert sum(matches(pdb["spec"]["selector"]["matchLabels"], p) for p in pods) == 1, name


def test_service_ports_name_container_ports():
    deployments = by_kind("Deployment")
    for name, svc in by_kind("Service").items():
        dep = next(d for d in deployments.values()
                   if matches(svc["spec"]["selector"], d["spec"]["template"]["metadata"]["labels"]))
        port_names = {p["name"] for c in dep["spec"]["template"]["spec"]["containers"] for p in c["ports"]}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names, name


def test_replica_deployment_gpu_probes_and_model_cache():
    dep = by_kind("Deployment")["leanserve-replica"]
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["resources"]["requests"]["nvidia.com/gpu"] == 1 == c["resources"]["limits"]["nvidia.com/gpu"]
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    mounts = {m["name"] for m in c["volumeMounts"]}
    claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert "model-cache" in mounts and claims <= set(by_kind("PersistentVolumeClaim"))
    assert claims


def test_router_discovers_replicas_through_the_headless_service():
    svc = by_kind("Service")["leanserve-replica"]
    assert svc["spec"]["clusterIP"] == "None"
    args = by_kind("Deployment")["leanserve-router"]["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[0] == "router"
    assert f"--discover=leanserve-replica:{svc['spec']['ports'][0]['port']}" in args
    # The router's own flags must exist: parse them with the real CLI.
    import argparse

    from leanserve.router.cli import add_router_arguments

    parser = argparse.ArgumentParser()
    add_router_arguments(parser)
    parsed = parser.parse_args(args[1:])
    assert parsed.discover == "leanserve-replica:8000"


def test_scaledobject_targets_the_replicas_on_queue_depth_and_ttft():
    (so,) = by_kind("ScaledObject").values()
    spec = so["spec"]
    assert spec["scaleTargetRef"]["name"] in by_kind("Deployment")
    assert 1 <= spec["minReplicaCount"] < spec["maxReplicaCount"]
    triggers = {t["name"]: t for t in spec["triggers"]}
    prom = [t for t in spec["triggers"] if t["type"] == "prometheus"]
    assert all({"serverAddress", "query", "threshold"} <= set(t["metadata"]) for t in prom)
    assert "vllm:num_requests_waiting" in triggers["queue-depth"]["metadata"]["query"]
    ttft = triggers["ttft-p95"]["metadata"]["query"]
    assert "histogram_quantile(0.95" in ttft and "vllm:time_to_first_token_seconds_bucket" in ttft
    assert all(isinstance(t["metadata"]["threshold"], str) for t in prom)  # KEDA wants strings
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > behavior["scaleUp"]["stabilizationWindowSeconds"]
    cron = triggers["morning-ramp"]["metadata"]
    assert {"timezone", "start", "end", "desiredReplicas"} <= set(cron)


def test_pdbs_keep_capacity():
    pdbs = by_kind("PodDisruptionBudget")
    assert pdbs["leanserve-replica"]["spec"]["maxUnavailable"] == 1
    assert pdbs["leanserve-router"]["spec"]["minAvailable"] >= 1
