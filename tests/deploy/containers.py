"""Every leanserve container the repo deploys, as its runtime would start it, worked out statically.

The image's ENTRYPOINT, CMD and ENV come from the Dockerfile; compose and Kubernetes then override
them by their own rules (below). What comes out is the argv and environment the process really gets,
so the tests can hand them to the real CLI and settings instead of eyeballing YAML.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from tests.deploy.conftest import ROOT

DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "docker-compose.yml"
K8S = ROOT / "deploy" / "k8s"
IMAGE_PREFIX = "leanserve:"


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        logical.append(current + stripped)
        current = ""
    out = []
    for item in logical:
        keyword, _, args = item.partition(" ")
        out.append((keyword.upper(), re.sub(r"\s+", " ", args).strip()))
    return out


def stages(steps: list[tuple[str, str]]) -> list[list[tuple[str, str]]]:
    """The build stages, each starting at its FROM."""
    out: list[list[tuple[str, str]]] = []
    for kw, args in steps:
        if kw == "FROM":
            out.append([])
        if out:
            out[-1].append((kw, args))
    return out


def apt_packages(stage: list[tuple[str, str]]) -> set[str]:
    """Package names passed to `apt-get install` in a stage's RUN instructions."""
    packages: set[str] = set()
    for kw, args in stage:
        if kw != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            words = command.split()
            if words[:2] == ["apt-get", "install"] or words[:3] == ["apt-get", "-y", "install"]:
                packages |= {w.split("=")[0] for w in words[2:] if not w.startswith("-") and w != "install"}
    return packages


def _exec_form(keyword: str, args: str) -> list[str]:
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        value = None
    # Shell form runs under /bin/sh -c as PID 1: SIGTERM never reaches leanserve, so no graceful drain.
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), (
        f"{keyword} {args} is not the exec (JSON) form")
    return value


def _env_pairs(args: str) -> dict[str, str]:
    words = shlex.split(args)
    if words and "=" not in words[0]:  # legacy `ENV KEY value with spaces`
        return {words[0]: " ".join(words[1:])}
    return dict(w.split("=", 1) for w in words)


@dataclass(frozen=True)
class Image:
    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]
    user: str


def image_config(text: str | None = None) -> Image:
    """ENTRYPOINT, CMD, ENV and USER of the final stage, which is what runs."""
    final = stages(instructions(DOCKERFILE.read_text() if text is None else text))[-1]
    entrypoint: list[str] | None = None
    cmd: list[str] = []
    env: dict[str, str] = {}
    user = "root"
    for kw, args in final:
        if kw == "ENTRYPOINT":
            entrypoint = _exec_form(kw, args)
        elif kw == "CMD":
            cmd = _exec_form(kw, args)
        elif kw == "ENV":
            env.update(_env_pairs(args))
        elif kw == "USER":
            user = args
    # Without its own ENTRYPOINT the stage inherits the base image's (nvidia/cuda has one), which
    # these checks cannot see.
    assert entrypoint is not None, "the final stage sets no ENTRYPOINT"
    return Image(entrypoint, cmd, env, user)


def _words(value: str | list[Any]) -> list[str]:
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def compose_argv(image: Image, service: dict[str, Any]) -> list[str]:
    """Compose: `entrypoint` replaces ENTRYPOINT and drops the image's CMD; `command` replaces CMD."""
    entrypoint = _words(service["entrypoint"]) if "entrypoint" in service else image.entrypoint
    if "command" in service:
        cmd = _words(service["command"])
    else:
        cmd = [] if "entrypoint" in service else image.cmd
    return entrypoint + cmd


def k8s_argv(image: Image, container: dict[str, Any]) -> list[str]:
    """Kubernetes: `command` replaces ENTRYPOINT and drops CMD; `args` alone replace CMD only."""
    if "command" in container:
        return [*container["command"], *container.get("args", [])]
    return [*image.entrypoint, *container.get("args", image.cmd)]


@dataclass
class Container:
    where: str
    role: str  # the leanserve subcommand it is meant to run
    argv: list[str]
    env: dict[str, str | None]  # None: set from a secret/field ref, value unknown here
    listen_port: int  # where its probes / healthcheck expect the server
    mounts: dict[str, str] = field(default_factory=dict)  # mount path -> "volume", "pvc", "bind", ...

    def persistent_mount_over(self, path: str) -> str | None:
        """The persistent mount holding ``path``, if any."""
        target = PurePosixPath(path)
        for mount, kind in self.mounts.items():
            if kind in ("volume", "pvc") and (target == PurePosixPath(mount)
                                              or PurePosixPath(mount) in target.parents):
                return mount
        return None


def compose_file() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_env(environment: dict[str, Any] | list[str] | None) -> dict[str, str | None]:
    if isinstance(environment, list):
        return {k: v for k, _, v in (item.partition("=") for item in environment)}
    return {k: None if v is None else str(v) for k, v in (environment or {}).items()}


def _compose_mounts(service: dict[str, Any]) -> dict[str, str]:
    mounts = {}
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, _, rest = volume.partition(":")
            target = rest.split(":")[0]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        else:
            target, kind = volume["target"], volume.get("type", "volume")
        mounts[target] = kind
    return mounts


def compose_containers(image: Image | None = None) -> list[Container]:
    image = image or image_config()
    out = []
    for name, service in compose_file()["services"].items():
        if not (str(service.get("image", "")).startswith(IMAGE_PREFIX) or "build" in service):
            continue
        test = " ".join(_words(service["healthcheck"]["test"]))
        port = re.search(r"127\.0\.0\.1:(\d+)/health", test)
        assert port, f"compose service {name}: healthcheck does not probe /health on a port"
        out.append(Container(
            where=f"compose service {name}",
            role="router" if name == "router" else "serve",
            argv=compose_argv(image, service),
            env={**image.env, **_compose_env(service.get("environment"))},
            listen_port=int(port.group(1)),
            mounts=_compose_mounts(service),
        ))
    return out


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    docs = []
    for name in listed:
        docs += [(name, d) for d in yaml.safe_load_all((K8S / name).read_text()) if d]
    return docs


def k8s_by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in k8s_documents() if d["kind"] == kind}


_ROLES = {"replica": "serve", "router": "router"}


def k8s_containers(image: Image | None = None) -> list[Container]:
    image = image or image_config()
    out = []
    for name, dep in k8s_by_kind("Deployment").items():
        pod = dep["spec"]["template"]
        volumes = {v["name"]: next(k for k in v if k != "name") for v in pod["spec"].get("volumes", [])}
        kinds = {"persistentVolumeClaim": "pvc"}
        for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
            if not c["image"].startswith(IMAGE_PREFIX):
                continue
            ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
            assert "http" in ports, f"{name}/{c['name']}: no containerPort named http"
            out.append(Container(
                where=f"k8s Deployment {name} container {c['name']}",
                role=_ROLES[pod["metadata"]["labels"]["app.kubernetes.io/component"]],
                argv=k8s_argv(image, c),
                env={**image.env, **{e["name"]: e.get("value") for e in c.get("env", [])}},
                listen_port=ports["http"],
                mounts={m["mountPath"]: kinds.get(volumes[m["name"]], volumes[m["name"]])
                        for m in c.get("volumeMounts", [])},
            ))
    return out


def all_containers() -> list[Container]:
    return compose_containers() + k8s_containers()


def deploy_texts() -> dict[str, str]:
    """Every deployment file that can name an environment variable, by repo-relative path."""
    paths = [DOCKERFILE, COMPOSE, *sorted((ROOT / "deploy").rglob("*.y*ml"))]
    return {str(Path(p).relative_to(ROOT)): Path(p).read_text() for p in paths}
