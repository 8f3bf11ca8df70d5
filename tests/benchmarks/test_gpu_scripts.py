"""The GPU benchmarks exit cleanly, saying so, where there is no CUDA; the GPU plot draws from the
recorded results."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA path")
@pytest.mark.parametrize(
    "args", [["kernels.py"], ["decode_step.py"], ["decode_step.py", "--matmul-probe"], ["quant.py", "--gpu-only"],
             ["awq_probe.py"], ["ncu_targets.py"]]
)
def test_gpu_benchmark_without_cuda_says_so_and_exits_0(args: list[str]) -> None:
    done = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "no CUDA" in done.stdout
    assert json.loads(done.stdout.strip().splitlines()[-1])["skipped"]


def test_plot_gpu_draws_the_recorded_results(tmp_path: Path) -> None:
    out = tmp_path / "gpu.png"
    done = subprocess.run([sys.executable, str(BENCH / "plot_gpu.py"), "--out", str(out)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_decode_step_builds_an_awq_twin_of_its_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """decode_step.py's awq_int4 variant: the same architecture with every decoder projection AWQ int4
    (here on the CPU, so its int4pack backend) and every float weight in fp16, about a third of the
    bf16 model's bytes per step outside the LM head, and a forward that runs."""
    monkeypatch.syspath_prepend(str(BENCH))
    import decode_step
    from leanserve.kernels import backend

    from leanserve.model.config import ModelConfig
    from leanserve.quant.awq_linear import AWQLinear
    from tests.conftest import build_tiny_checkpoint

    config = ModelConfig.from_pretrained(build_tiny_checkpoint(tmp_path, hidden_size=256, intermediate_size=512))
    ops = backend.get_model_ops("cpu")
    dense = decode_step.build_model(config, torch.device("cpu"), torch.bfloat16, ops)
    awq = decode_step.build_model(config, torch.device("cpu"), torch.float16, ops, awq_group=128)
    projections = [m for m in awq.modules() if isinstance(m, AWQLinear)]
    assert len(projections) == 4 * config.num_hidden_layers
    assert {t.dtype for t in awq.parameters()} == {torch.float16}  # embedding, norms, LM head: as served
    lm_head = config.vocab_size * config.hidden_size * 2  # 2-byte floats in both
    ratio = (decode_step.read_bytes(awq) - lm_head) / (decode_step.read_bytes(dense) - lm_head)
    assert 0.25 < ratio < 0.35  # int4 codes plus scales and zeros, against bf16
    hidden = awq.model.layers[0].mlp(torch.randn(3, config.hidden_size, dtype=torch.float16))
    assert hidden.shape == (3, config.hidden_size) and torch.isfinite(hidden).all()
