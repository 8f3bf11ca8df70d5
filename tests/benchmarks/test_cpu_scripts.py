"""Smoke tests for the CPU step benchmarks, end to end on a tiny random model (as subprocesses: they
set the OpenMP environment before torch, as the server does)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import needs_onednn_bf16
from tests.quant.conftest import write_word_text

BENCH = Path(__file__).resolve().parents[2] / "benchmarks"


def run_script(*args: str) -> dict:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, cwd=BENCH)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cpu_decode_times_both_paths_and_finds_them_equal(tiny_llama_dir: Path) -> None:
    result = run_script(str(BENCH / "cpu_decode.py"), "--model", str(tiny_llama_dir), "--batches", "1,3",
                        "--rounds", "1", "--iters", "3", "--context", "40")
    for batch in ("batch1", "batch3"):
        assert result[batch]["equal"] is True
        assert result[batch]["flat_ms"] > 0 and result[batch]["layers_ms"] > 0
    assert result["floor_ms"] > 0 and result["read_gbps"] > 0


@pytest.mark.slow
@needs_onednn_bf16
def test_cpu_bf16_measures_speed_and_quality(tiny_llama_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_word_text(data / "book.txt", words=4000)  # the tiny checkpoint's vocabulary, t0..t299
    plot = tmp_path / "bf16.png"
    result = run_script(str(BENCH / "cpu_bf16.py"), "--model", str(tiny_llama_dir), "--rounds", "1", "--iters", "2",
                        "--eval-tokens", "512", "--data-dir", str(data), "--plot", str(plot))
    assert set(result["speed"]) == {"decode_b1", "decode_b16", "mixed_16x1_plus_240"}
    assert all(s["fp32_ms"] > 0 and s["bf16_ms"] > 0 for s in result["speed"].values())
    quality = result["quality"]["book"]
    assert quality["tokens"] == 511 and quality["ppl_fp32"] > 1 and 0.5 < quality["top1_agreement"] <= 1
    assert 0 <= quality["mean_kl"] < 0.01 and abs(quality["ppl_bf16"] / quality["ppl_fp32"] - 1) < 0.01
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_long_prompt_ttft_short_request_starts_beside_the_prefill(tiny_llama_dir: Path) -> None:
    result = run_script(str(BENCH / "long_prompt_ttft.py"), "--model", str(tiny_llama_dir), "--long", "400",
                        "--after-chunks", "1", "--max-num-batched-tokens", "64")
    # The short prompt runs in the next step, not after the long one's 5 remaining 64-token chunks.
    assert result["max_num_batched_tokens"] == 64
    assert result["short_ttft_steps"] == 1 and result["short_ttft_s"] > 0
    assert result["long_finished_step"] >= 6  # 336 tokens left, at most 64 a step, then a decode
