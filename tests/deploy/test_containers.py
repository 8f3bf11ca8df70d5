"""Each deployed container's real argv and environment, run through leanserve's own CLI and settings.

No container starts: the argv goes through ``leanserve.cli.build_parser`` (argparse exits 2 on a bad
argv, the crash loop a container would be in) and a `serve` container's environment through
``load_settings``, which is everything `leanserve serve` does before it loads a model.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import io
import os
import re
from pathlib import Path

import pytest

from tests.deploy.containers import (
    Container,
    Image,
    all_containers,
    compose_argv,
    deploy_texts,
    image_config,
    k8s_argv,
    k8s_by_kind,
)

CONTAINERS = all_containers()


def parse_leanserve_argv(argv: list[str]) -> argparse.Namespace:
    """``argv`` as the `leanserve` console script would parse it; AssertionError where it would exit."""
    scripts = importlib.metadata.entry_points(group="console_scripts", name=argv[0] if argv else "")
    assert [s.value for s in scripts] == ["leanserve.cli:main"], f"{argv}: does not run the leanserve CLI"
    from leanserve.cli import build_parser

    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(argv[1:])
    except SystemExit as exc:
        raise AssertionError(f"`{' '.join(argv)}` exits {exc.code}: {stderr.getvalue().strip()}") from None
    # No subcommand: main() prints the help and returns 2.
    assert getattr(args, "func", None) is not None, f"`{' '.join(argv)}` names no subcommand"
    return args


def serve_settings(container: Container, args: argparse.Namespace, monkeypatch: pytest.MonkeyPatch):
    from leanserve.cli import serve_overrides
    from leanserve.settings import load_settings

    for name in list(os.environ):
        if name.upper().startswith("LEANSERVE_"):
            monkeypatch.delenv(name)
    for name, value in container.env.items():
        if name.upper().startswith("LEANSERVE_") and value is not None:
            monkeypatch.setenv(name, value)
    return load_settings(**serve_overrides(args))


def test_every_deployment_is_found() -> None:
    roles = {(c.where.split()[0], c.role) for c in CONTAINERS}
    assert roles == {("compose", "serve"), ("compose", "router"), ("k8s", "serve"), ("k8s", "router")}


@pytest.mark.parametrize("container", CONTAINERS, ids=lambda c: c.where)
def test_argv_parses_with_the_real_cli(container: Container, monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse_leanserve_argv(container.argv)
    assert args.command == container.role, f"{container.where} runs `{args.command}`"
    if container.role == "serve":
        settings = serve_settings(container, args, monkeypatch)
        host, port = settings.host, settings.port
    else:
        host, port = args.host, args.port
    # Listening on loopback inside a container answers nobody, its probes included.
    assert host == "0.0.0.0", f"{container.where} listens on {host}"
    assert port == container.listen_port, f"{container.where} listens on {port}, probed on {container.listen_port}"


def test_broken_argvs_fail_the_check() -> None:
    """The QA report's crash loops: an ENTRYPOINT that already says `serve`, plus a subcommand."""
    old_image = Image(entrypoint=["leanserve", "serve"], cmd=[], env={}, user="10001")
    replica = {"args": ["serve", "--host", "0.0.0.0", "--port", "8000"]}
    router = {"args": ["router", "--discover=leanserve-replica:8000"]}
    for argv in (k8s_argv(old_image, replica), k8s_argv(old_image, router)):
        with pytest.raises(AssertionError, match="exits 2"):
            parse_leanserve_argv(argv)
    with pytest.raises(AssertionError, match="names no subcommand"):
        parse_leanserve_argv(["leanserve"])
    with pytest.raises(AssertionError, match="does not run the leanserve CLI"):
        parse_leanserve_argv(["python3", "-m", "leanserve"])


def test_override_rules_follow_docker_and_kubernetes() -> None:
    image = Image(entrypoint=["ep"], cmd=["c1"], env={}, user="1")
    assert compose_argv(image, {}) == ["ep", "c1"]
    assert compose_argv(image, {"command": "a 'b c'"}) == ["ep", "a", "b c"]
    assert compose_argv(image, {"entrypoint": ["e2"]}) == ["e2"]  # the image's CMD is dropped
    assert compose_argv(image, {"entrypoint": ["e2"], "command": ["x"]}) == ["e2", "x"]
    assert k8s_argv(image, {}) == ["ep", "c1"]
    assert k8s_argv(image, {"args": ["x"]}) == ["ep", "x"]
    assert k8s_argv(image, {"command": ["e2"]}) == ["e2"]
    assert k8s_argv(image, {"command": ["e2"], "args": ["x"]}) == ["e2", "x"]


# ---- environment variables -----------------------------------------------------------------------


def settings_env_names() -> set[str]:
    """What ``ServerSettings`` reads from the environment: each field, and each section's fields."""
    from pydantic import BaseModel

    from leanserve.settings import ServerSettings

    prefix = ServerSettings.model_config["env_prefix"].upper()
    delimiter = ServerSettings.model_config["env_nested_delimiter"]
    names = set()
    for name, info in ServerSettings.model_fields.items():
        names.add(prefix + name.upper())
        if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
            names |= {f"{prefix}{name}{delimiter}{sub}".upper() for sub in info.annotation.model_fields}
    return names


def standalone_env_names() -> set[str]:
    """LEANSERVE_* variables the code reads itself, outside the settings model: the list in settings,
    which tests/api/test_settings.py keeps equal to what src/ and kernels/ read."""
    from leanserve.settings import STANDALONE_ENV_VARS

    return set(STANDALONE_ENV_VARS)


def unknown_env_names(named: dict[str, set[str]]) -> list[str]:
    settings, standalone = settings_env_names(), standalone_env_names()
    # pydantic-settings matches names case-insensitively; os.environ lookups are exact.
    return [f"{where}: {name}" for where, names in named.items() for name in sorted(names)
            if name.upper() not in settings and name not in standalone]


def test_every_leanserve_variable_named_in_deployment_files_is_read() -> None:
    named: dict[str, set[str]] = {}
    for path, text in deploy_texts().items():
        named.setdefault(path, set()).update(re.findall(r"\bLEANSERVE_[A-Z0-9_]+", text))
    for c in CONTAINERS:  # set keys, whatever their case
        named.setdefault(c.where, set()).update(k for k in c.env if k.upper().startswith("LEANSERVE_"))
    assert sum(map(len, named.values())) > 5, "found almost no variables: the scan is broken"
    assert not unknown_env_names(named), unknown_env_names(named)


def test_env_check_knows_the_real_names_and_rejects_the_old_one() -> None:
    assert {"LEANSERVE_CACHE_DIR", "LEANSERVE_AWQ_BACKEND", "LEANSERVE_PDL"} <= standalone_env_names()
    assert {"LEANSERVE_HOST", "LEANSERVE_ENGINE__DEVICE", "LEANSERVE_COST__USD_PER_GPU_HOUR"} <= settings_env_names()
    assert unknown_env_names({"k8s": {"LEANSERVE_MODEL_CACHE", "leanserve_engine__device"}}) == [
        "k8s: LEANSERVE_MODEL_CACHE"]


# ---- where the model cache lands -----------------------------------------------------------------


@pytest.mark.parametrize("container", [c for c in CONTAINERS if c.role == "serve"], ids=lambda c: c.where)
def test_model_cache_is_on_a_persistent_volume(container: Container, monkeypatch: pytest.MonkeyPatch) -> None:
    """Otherwise every start (every pod, on Kubernetes) converts the GGUF again into a scratch layer."""
    settings = serve_settings(container, parse_leanserve_argv(container.argv), monkeypatch)
    # The order leanserve.model.embedded resolves it in.
    default = str(Path.home() / ".cache" / "leanserve")
    cache = settings.engine.cache_dir or os.environ.get("LEANSERVE_CACHE_DIR") or default
    assert container.persistent_mount_over(cache), (
        f"{container.where}: the model cache {cache} is on none of its persistent mounts {container.mounts}")


def test_cache_volume_is_writable_by_the_image_user() -> None:
    """A fresh PVC is root-owned and the image runs as a numeric non-root user: fsGroup bridges them."""
    uid, _, gid = image_config().user.partition(":")
    assert uid.isdigit() and uid != "0"
    for name, dep in k8s_by_kind("Deployment").items():
        pod = dep["spec"]["template"]["spec"]
        if any("persistentVolumeClaim" in v for v in pod.get("volumes", [])):
            assert pod.get("securityContext", {}).get("fsGroup") == int(gid or uid), name


def test_no_pod_gets_service_links_that_read_as_settings() -> None:
    """A Service named leanserve makes Kubernetes inject LEANSERVE_PORT=tcp://... (and more) into every
    pod of the namespace unless the pod spec turns service links off."""
    assert "leanserve" in k8s_by_kind("Service"), "no Service named leanserve: this check is moot"
    for name, deployment in k8s_by_kind("Deployment").items():
        assert deployment["spec"]["template"]["spec"].get("enableServiceLinks") is False, name
