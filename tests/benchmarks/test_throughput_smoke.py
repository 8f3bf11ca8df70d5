"""Smoke test for benchmarks/throughput.py: all three phases run end to end on a tiny random model."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "throughput.py"


def load_script() -> ModuleType:
    # benchmarks/ is not a package; load the script by path.
    spec = importlib.util.spec_from_file_location("throughput_bench", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_throughput_smoke(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # The tiny checkpoint has a word-level vocabulary t0..t299, so the "book" is made of those words.
    data = tmp_path / "book.txt"
    data.write_text(" ".join(f"t{5 + i % 290}" for i in range(2000)))
    summary = load_script().main(
        [
            "--model", str(tiny_llama_dir),
            "--data", str(data),
            "--num-requests", "6",
            "--prompt-len", "8", "32",
            "--output-len", "4", "16",
            "--kv-cache-memory", "16000000",  # 16 MB: zeroing the default 4 GiB would dominate the test
        ]
    )  # fmt: skip

    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert json.loads(last_line) == json.loads(json.dumps(summary))  # the JSON is the last line printed
    for key in (
        "engine_tok_s",
        "hf_static_tok_s",
        "hf_continuous_tok_s",
        "ratio_vs_hf_static",
        "ratio_vs_hf_continuous",
    ):
        assert summary[key] is not None and summary[key] > 0, key
    assert 0 < summary["engine_overhead_share"] < 1
    assert summary["workload"]["num_requests"] == 6
    assert summary["output_tokens"] >= 6 * 4
    assert summary["hf_continuous_error"] is None
