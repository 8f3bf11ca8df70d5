"""The flat CPU decode loop (``model/cpu_decode.py``) against the decoder layer modules.

It claims the same ops in the same order, so every decode step's hidden states must equal
``forward_layers``' bit for bit. Covered: llama and qwen2 (biased q/k/v); packed and plain fp32 weights,
bf16 matmul weights under fp32, a bf16 model, and the real AutoAWQ fixture through the int4 kernel; lone
sequences (the cache read as a view) and batches whose block tables need a gather.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from leanserve.model.cpu_decode import CpuDecoder
from leanserve.model.loader import load_model
from leanserve.model.runner import ModelRunner, StepSeq, allocate_kv_cache
from leanserve.model.sampler import SampleRequest
from leanserve.sampling_params import SamplingParams
from tests.conftest import AWQ_FIXTURE, build_tiny_checkpoint, needs_awq_fixture, needs_onednn_bf16, random_norms

CPU = torch.device("cpu")
BLOCK = 4


def decode_steps(model, prompts: list[list[int]], tables: list[list[int]], steps: int) -> list[list[int]]:
    """Prefill every prompt in one step, then ``steps`` greedy decode steps of all of them, then
    ``steps`` of the first alone; returns each sequence's tokens."""
    dtype = model.model.embed_tokens.weight.dtype
    runner = ModelRunner(model, allocate_kv_cache(model.config, 64, BLOCK, dtype, CPU), BLOCK, CPU)
    params = SamplingParams(temperature=0, max_tokens=4 * steps)
    tokens = [list(p) for p in prompts]

    def step(which: list[int], prefill: bool) -> None:
        seqs = []
        for i in which:
            computed = 0 if prefill else len(tokens[i]) - 1
            seqs.append(StepSeq(tokens[i], computed, len(tokens[i]) - computed, tables[i], len(prompts[i]),
                                SampleRequest(params, tokens[i], len(prompts[i]))))
        for i, result in zip(which, runner.execute(seqs), strict=True):
            tokens[i].append(result.token_id)

    everyone = list(range(len(prompts)))
    step(everyone, prefill=True)
    for _ in range(steps):
        step(everyone, prefill=False)
    for _ in range(steps):
        step([0], prefill=False)
    return tokens


def spy_both_paths(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, bool]]:
    """Make every flat decode step also run the layer modules; record (rows, hidden states equal)."""
    seen: list[tuple[int, bool]] = []
    flat = CpuDecoder.__call__

    def both(self, input_ids, positions, kv_caches, meta):
        got = flat(self, input_ids, positions, kv_caches, meta)
        want = self.model.forward_layers(input_ids, positions, kv_caches, meta)  # rewrites the same K/V
        seen.append((input_ids.shape[0], torch.equal(got, want)))
        return got

    monkeypatch.setattr(CpuDecoder, "__call__", both)
    return seen


# Seq 0's blocks are one ascending run (its lone steps read the cache as a view); the others are shuffled.
PROMPTS = [[5, 17, 42, 8, 99], [3, 250, 7, 7, 19, 64, 2, 11, 30], [120, 44, 9, 1 + 1, 77, 13, 56, 91, 200, 6, 31, 8, 4]]
TABLES = [list(range(0, 8)), [19, 11, 15, 9, 30, 8, 25, 14], [40, 33, 47, 36, 45, 50, 34, 41, 60, 38]]


FP32, BF16 = torch.float32, torch.bfloat16


@pytest.mark.parametrize(
    ("arch", "packed", "dtype", "matmul_dtype"),
    [("llama", True, FP32, FP32), ("llama", False, FP32, FP32), ("qwen2", True, FP32, FP32),
     ("qwen2", False, FP32, FP32), ("llama", False, BF16, BF16),
     pytest.param("qwen2", True, FP32, BF16, marks=needs_onednn_bf16)],
)
def test_flat_decode_equals_the_layers(
    arch: str, packed: bool, dtype: torch.dtype, matmul_dtype: torch.dtype, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = load_model(build_tiny_checkpoint(tmp_path, arch, adjust=random_norms), CPU, dtype,
                       pack_weights=packed, cpu_matmul_dtype=matmul_dtype)
    seen = spy_both_paths(monkeypatch)
    decode_steps(model, PROMPTS, TABLES, steps=5)
    # The prefill took the layers; each decode step the flat loop (3 rows, then seq 0 alone).
    assert [rows for rows, _ in seen] == [3] * 5 + [1] * 5
    assert all(equal for _, equal in seen)


@needs_awq_fixture
def test_flat_decode_equals_the_layers_int4(monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(AWQ_FIXTURE, CPU, torch.float32)
    seen = spy_both_paths(monkeypatch)
    vocab = model.config.vocab_size
    decode_steps(model, [[t % vocab for t in p] for p in PROMPTS], TABLES, steps=4)
    assert [rows for rows, _ in seen] == [3] * 4 + [1] * 4
    assert all(equal for _, equal in seen)


def test_flat_decode_tokens_equal_the_layers_tokens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """End to end through the runner: the same greedy tokens with the flat loop as without it."""
    model = load_model(build_tiny_checkpoint(tmp_path, "llama", adjust=random_norms), CPU, torch.float32)
    with_flat = decode_steps(model, PROMPTS, TABLES, steps=6)
    monkeypatch.setattr(CpuDecoder, "__call__", lambda self, *a: self.model.forward_layers(*a))
    assert decode_steps(model, PROMPTS, TABLES, steps=6) == with_flat


def test_mixed_steps_take_the_layers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step with a prefill chunk beside its decodes is not the flat loop's."""
    model = load_model(build_tiny_checkpoint(tmp_path, "llama"), CPU, torch.float32)
    monkeypatch.setattr(CpuDecoder, "__call__", lambda *a: pytest.fail("flat loop on a mixed step"))
    runner = ModelRunner(model, allocate_kv_cache(model.config, 64, BLOCK, torch.float32, CPU), BLOCK, CPU)
    params = SamplingParams(temperature=0, max_tokens=4)
    decode = StepSeq([5, 17, 42, 8], 3, 1, [0], 3, SampleRequest(params, [5, 17, 42, 8], 3))
    prefill = StepSeq([3, 250, 7], 0, 3, [1], 3, SampleRequest(params, [3, 250, 7], 3))
    assert all(r.token_id is not None for r in runner.execute([decode, prefill]))
