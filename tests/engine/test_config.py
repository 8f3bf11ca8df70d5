"""``EngineConfig``'s resolution of its "auto" settings."""

from __future__ import annotations

import pytest
import torch

from leanserve.engine.config import EngineConfig

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


@pytest.mark.parametrize("native", [True, False])
def test_cpu_matmul_dtype_auto_follows_the_cpu(native: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("leanserve.model.layers.cpu_has_native_bf16", lambda: native)
    monkeypatch.setattr("leanserve.model.layers.cpu_bf16_matmul_supported", lambda: True)
    want = torch.bfloat16 if native else torch.float32
    assert EngineConfig().resolve_cpu_matmul_dtype(CPU, torch.float32) == want
    # Set explicitly, it wins over the CPU either way.
    assert EngineConfig(cpu_matmul_dtype="float32").resolve_cpu_matmul_dtype(CPU, torch.float32) == torch.float32
    assert EngineConfig(cpu_matmul_dtype="bfloat16").resolve_cpu_matmul_dtype(CPU, torch.float32) == torch.bfloat16


def test_cpu_matmul_dtype_touches_only_fp32_models_on_the_cpu() -> None:
    config = EngineConfig(cpu_matmul_dtype="bfloat16")
    assert config.resolve_cpu_matmul_dtype(CUDA, torch.float32) == torch.float32
    assert config.resolve_cpu_matmul_dtype(CUDA, torch.bfloat16) == torch.bfloat16
    assert config.resolve_cpu_matmul_dtype(CPU, torch.float16) == torch.float16


def test_cpu_matmul_dtype_rejects_other_names() -> None:
    with pytest.raises(ValueError, match="cpu_matmul_dtype"):
        EngineConfig(cpu_matmul_dtype="int8").resolve_cpu_matmul_dtype(CPU, torch.float32)


def test_cpu_matmul_dtype_needs_onednn_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """Where oneDNN cannot multiply bf16 at all, auto keeps fp32 and an explicit bfloat16 is an error."""
    monkeypatch.setattr("leanserve.model.layers.cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr("leanserve.model.layers.cpu_bf16_matmul_supported", lambda: False)
    assert EngineConfig().resolve_cpu_matmul_dtype(CPU, torch.float32) == torch.float32
    with pytest.raises(ValueError, match="cannot run bf16"):
        EngineConfig(cpu_matmul_dtype="bfloat16").resolve_cpu_matmul_dtype(CPU, torch.float32)


def test_dtype_auto_is_fp32_on_the_cpu_and_fp16_for_awq_on_cuda() -> None:
    config = EngineConfig()
    assert config.resolve_dtype(CPU) == torch.float32
    assert config.resolve_dtype(CPU, awq=True) == torch.float32
    assert config.resolve_dtype(CUDA) == torch.bfloat16
    assert config.resolve_dtype(CUDA, awq=True) == torch.float16  # AWQ's scales, and the GEMV's half2 math
    assert EngineConfig(dtype="bfloat16").resolve_dtype(CUDA, awq=True) == torch.bfloat16  # set, it wins
