"""Decode CUDA graphs: bucketing, padding that touches nothing, and outputs equal to eager steps.

The padded static-buffer path runs eagerly on CPU (``use_graphs=False``), so the padding and buffer
handling are checked everywhere; the captured graphs themselves only on a CUDA machine.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from leanserve.engine.config import EngineConfig
from leanserve.engine.llm_engine import LLMEngine
from leanserve.model.cuda_graphs import DecodeInputs, decode_buckets
from leanserve.sampling_params import SamplingParams
from tests.engine.test_correctness import hf_greedy, random_prompts, run_staggered


def test_buckets_cover_every_batch_size_up_to_the_largest() -> None:
    assert decode_buckets(1) == [1]
    assert decode_buckets(6) == [1, 2, 4, 6]
    assert decode_buckets(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    buckets = decode_buckets(100)
    assert buckets[-1] == 100
    for n in range(1, 101):  # the smallest bucket holding n wastes under 8 rows (or half, below 8)
        b = next(b for b in buckets if b >= n)
        assert b - n < max(8, n)


def count_graph_runs(engine: LLMEngine) -> list[int]:
    """Record the batch size of every step the decode-graph path served."""
    graphs = engine.runner.decode_graphs
    assert graphs is not None
    sizes: list[int] = []
    original = graphs.run

    def run(inputs: DecodeInputs) -> torch.Tensor:
        sizes.append(len(inputs.token_ids))
        return original(inputs)

    graphs.run = run
    return sizes


def generate(engine: LLMEngine, prompts: list[list[int]], max_new: int) -> dict[str, list[int]]:
    params = SamplingParams(max_tokens=max_new, temperature=0.0, ignore_eos=True)
    return run_staggered(engine, prompts, params)


def test_padded_decode_path_matches_the_eager_step(tiny_llama_dir: Path) -> None:
    prompts = random_prompts(300, [3, 17, 40, 9, 65], seed=11)
    config = EngineConfig(model=str(tiny_llama_dir), device="cpu", kv_cache_memory=1 << 20)
    reference = generate(LLMEngine(config), prompts, 20)
    engine = LLMEngine(config)
    engine.runner.capture_decode_graphs(engine.max_model_len, max_batch=8, use_graphs=False)
    sizes = count_graph_runs(engine)
    assert generate(engine, prompts, 20) == reference
    # Batches of 3, 5 (padded to 4 and 8) and the tail as sequences finish all took the padded path.
    assert len(sizes) > 10 and {3, 5} <= set(sizes)
    assert engine.block_manager.num_used_blocks == 0


def test_padding_rows_write_no_kv_slot(tiny_llama_dir: Path) -> None:
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), device="cpu", kv_cache_memory=1 << 20))
    engine.runner.capture_decode_graphs(engine.max_model_len, max_batch=8, use_graphs=False)
    graphs = engine.runner.decode_graphs
    for k_cache, v_cache in engine.runner.kv_caches:
        k_cache.fill_(7.0)
        v_cache.fill_(7.0)
    # Three real decodes (bucket 4: one padding row whose table row points at block 0).
    inputs = DecodeInputs(
        token_ids=[5, 6, 7], positions=[0, 16, 33], slots=[1 * 16, 2 * 16, 3 * 16 + 1],
        block_tables=[[1], [4, 2], [5, 6, 3]], context_lens=[1, 17, 34],
    )
    hidden = graphs.run(inputs)
    assert hidden.shape[0] == 3 and torch.isfinite(hidden).all()
    written = {(1, 0), (2, 0), (3, 1)}
    for k_cache, _ in engine.runner.kv_caches:
        changed = {(b, o) for b, o in ((k_cache != 7.0).any(-1).any(-1)).nonzero().tolist()}
        assert changed == written


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pdl", ["0", "1"])  # programmatic dependent launch (sm_90+) off and on
def test_cuda_graphs_match_eager_and_transformers(tiny_llama_dir: Path, pdl: str, monkeypatch) -> None:
    monkeypatch.setenv("LEANSERVE_PDL", pdl)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    prompts = random_prompts(hf.config.vocab_size, [1, 5, 16, 17, 33, 48, 64, 90, 7, 120], seed=1)
    outputs = {}
    for eager in (True, False):
        config = EngineConfig(
            model=str(tiny_llama_dir), device="cuda", dtype="float32", kv_cache_memory=1 << 24,
            max_num_seqs=16, enforce_eager=eager,
        )
        engine = LLMEngine(config)
        assert (engine.runner.decode_graphs is None) == eager
        sizes = [] if eager else count_graph_runs(engine)
        outputs[eager] = generate(engine, prompts, 24)
        if not eager:
            assert len(sizes) > 10
    assert outputs[True] == outputs[False]
    for i, prompt in enumerate(prompts):
        assert outputs[False][str(i)] == hf_greedy(hf, prompt, 24), f"prompt {i}"
