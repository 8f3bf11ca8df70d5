"""Backend selection, and a kernels package that imports without triton."""

from __future__ import annotations

import subprocess
import sys

import torch
from leanserve.kernels import backend, reference


def test_interpreter_selects_triton_ops_on_cpu(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backend.triton_available()
    ops = backend.get_attention_ops(torch.device("cpu"))
    assert ops.name == "triton"
    assert ops.paged_decode_attention is not reference.paged_decode_attention


def test_cpu_without_interpreter_selects_references(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ops = backend.get_attention_ops("cpu")
    assert ops.name == "reference"
    assert ops.write_kv_cache is reference.write_kv_cache
    assert ops.paged_prefill_attention is reference.paged_prefill_attention
    if not torch.cuda.is_available():
        assert not backend.triton_available()


def test_package_imports_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"  # any `import triton` now raises ImportError
        "import leanserve.kernels, leanserve.kernels.reference\n"
        "from leanserve.kernels import backend\n"
        "assert not backend.triton_available()\n"
        "print(backend.get_attention_ops('cpu').name)\n"
    )
    env = {"TRITON_INTERPRET": "1", "PATH": ""}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert result.stdout.strip() == "reference"


def test_trusted_inputs_skip_value_checks_only_inside_the_block() -> None:
    from leanserve.kernels import _checks
    from leanserve.kernels.backend import trusted_inputs

    assert _checks.value_checks_enabled()
    with trusted_inputs():
        assert not _checks.value_checks_enabled()
    assert _checks.value_checks_enabled()
