"""The decoder's fused layer path for small decode batches (``LlamaDecoderLayer.forward_decode``).

On CUDA it folds the MLP gating and the residual adds into the projections' GEMVs. Here its reference
forms run on the CPU: they are the same ops in the same order, so the two paths must agree bit for bit,
and any wiring mistake (a norm's weight on the wrong projection, a residual added twice) shows.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from leanserve.kernels import backend

from leanserve.model.llama import LlamaDecoderLayer
from leanserve.model.loader import load_model
from leanserve.model.runner import ModelRunner, StepSeq, allocate_kv_cache
from leanserve.model.sampler import SampleRequest
from leanserve.sampling_params import SamplingParams
from tests.conftest import build_tiny_checkpoint, random_norms

CPU = torch.device("cpu")
BLOCK = 4


def generate(model, prompt: list[int], steps: int) -> list[tuple[int, float, list]]:
    """Greedy tokens with their logprob and top-3 alternatives: a prefill, then ``steps`` one-row decodes."""
    kv = allocate_kv_cache(model.config, 16, BLOCK, torch.float32, CPU)
    runner = ModelRunner(model, kv, BLOCK, CPU)
    tokens = list(prompt)
    params = SamplingParams(temperature=0, logprobs=3, max_tokens=steps + 1)
    table = list(range(16))
    out = []
    for step in range(steps + 1):
        computed = 0 if step == 0 else len(tokens) - 1
        seq = StepSeq(tokens, computed, len(tokens) - computed, table, len(prompt),
                      SampleRequest(params, tokens, len(prompt)))
        result = runner.execute([seq])[0]
        tokens.append(result.token_id)
        out.append((result.token_id, result.logprob, result.top_logprobs))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: biased q/k/v projections
def test_fused_decode_path_equals_the_layer_path(arch: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(build_tiny_checkpoint(tmp_path, arch, adjust=random_norms), CPU, torch.float32,
                       pack_weights=False)
    prompt = [5, 17, 42, 8, 99, 3, 250]
    want = generate(model, prompt, 6)

    calls = []
    real = LlamaDecoderLayer.forward_decode
    monkeypatch.setattr(LlamaDecoderLayer, "forward_decode", lambda self, *a: calls.append(1) or real(self, *a))
    model.decode_ops = dataclasses.replace(backend.reference_decode_ops(), max_rows=lambda device: 1)
    got = generate(model, prompt, 6)
    assert len(calls) == 6 * model.config.num_hidden_layers  # every decode step, never the prefill
    assert got == want


def test_fused_decode_path_skips_packed_weights(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Weights packed for oneDNN (or int4) are not the plain matrices forward_decode reads."""
    model = load_model(build_tiny_checkpoint(tmp_path, "llama"), CPU, torch.float32)
    model.decode_ops = dataclasses.replace(backend.reference_decode_ops(), max_rows=lambda device: 1)
    if model.model.layers[0].self_attn.qkv_proj.packed is None:
        pytest.skip("no oneDNN packing here: every weight stays plain")
    monkeypatch.setattr(LlamaDecoderLayer, "forward_decode", lambda *a: pytest.fail("took the fused path"))
    assert len(generate(model, [5, 17, 42], 2)) == 3


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("enforce_eager", [True, False])  # eager steps, and the batch-1 CUDA graph
def test_fused_decode_path_on_cuda_matches_transformers(tiny_llama_dir: Path, enforce_eager: bool,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One request at a time, so every decode step is a 1-row batch: with PDL (sm_90+) the fused GEMVs
    run them; greedy tokens equal transformers' in fp32."""
    from transformers import AutoModelForCausalLM

    from leanserve.engine.config import EngineConfig
    from leanserve.engine.llm_engine import LLMEngine
    from tests.engine.test_correctness import hf_greedy, random_prompts

    monkeypatch.setenv("LEANSERVE_PDL", "1")
    if torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the fused path needs PDL (sm_90+)")
    calls = []
    real = LlamaDecoderLayer.forward_decode
    monkeypatch.setattr(LlamaDecoderLayer, "forward_decode", lambda self, *a: calls.append(1) or real(self, *a))
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), device="cuda", dtype="float32",
                                    kv_cache_memory=1 << 24, max_num_seqs=4, enforce_eager=enforce_eager))
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    for i, prompt in enumerate(random_prompts(hf.config.vocab_size, [1, 9, 40], seed=3)):
        engine.add_request(str(i), prompt, params)
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens.extend(out.new_token_ids)
        assert tokens == hf_greedy(hf, prompt, 16), f"prompt {i}"
    assert calls  # captured into the graph, or run eagerly: either way through forward_decode
