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
