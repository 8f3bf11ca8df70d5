"""AutoAWQ GEMM format: bit layout, round trips, and a real AutoAWQ checkpoint through our loader/engine."""

from __future__ import annotations

import json

import pytest
import torch
from leanserve.kernels.awq_reference import pack_awq, unpack_awq
from safetensors import safe_open

from leanserve.quant.awq_format import (
    QuantizedWeight,
    dequantize_checkpoint_linear,
    fake_quantize,
    quantization_config,
    quantize_weight,
)
from tests.conftest import AWQ_FIXTURE, needs_awq_fixture


def test_pack_puts_columns_in_awq_nibble_order() -> None:
    # Nibble i holds column (0, 2, 4, 6, 1, 3, 5, 7)[i]: columns 0..7 with value = column index.
    word = pack_awq(torch.arange(8).reshape(1, 8))
    assert word.item() == 0x75316420
    assert unpack_awq(word).tolist() == [list(range(8))]  # and back: unpack's shifts are the inverse order
    # Nibble 7 >= 8 sets the sign bit: stored as a negative int32, as AutoAWQ does.
    high = pack_awq(torch.full((1, 8), 15))
    assert high.item() == -1
    assert unpack_awq(high).tolist() == [[15] * 8]


def test_pack_unpack_round_trip() -> None:
    values = torch.randint(0, 16, (37, 64), generator=torch.Generator().manual_seed(0))
    packed = pack_awq(values)
    assert packed.dtype == torch.int32 and packed.shape == (37, 8)
    assert torch.equal(unpack_awq(packed).long(), values)


def test_pack_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="multiple of 8"):
        pack_awq(torch.zeros(2, 12, dtype=torch.long))
    with pytest.raises(ValueError, match="0..15"):
        pack_awq(torch.full((1, 8), 16))


def test_quantize_round_trip_and_error_bound() -> None:
    w = torch.randn(48, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    qw = quantize_weight(w, 64)
    tensors = qw.to_awq()
    assert tensors["qweight"].shape == (256, 6) and tensors["qweight"].dtype == torch.int32
    assert tensors["qzeros"].shape == (4, 6) and tensors["scales"].shape == (4, 48)
    assert tensors["scales"].dtype == torch.float16
    back = QuantizedWeight.from_awq(tensors["qweight"], tensors["qzeros"], tensors["scales"], 64)
    assert torch.equal(back.q, qw.q) and torch.equal(back.zeros, qw.zeros)
    deq = dequantize_checkpoint_linear(tensors["qweight"], tensors["qzeros"], tensors["scales"], 64)
    assert torch.equal(deq, qw.dequantize())
    assert torch.equal(deq, fake_quantize(w, 64))  # the search's fake quantization is the real one
    step = qw.scales.float().repeat_interleave(64, dim=1)
    assert ((deq - w).abs() <= step * 1.01).all()  # within one step (the zero point is rounded too)


@needs_awq_fixture
def test_fixture_bits_repack_identically() -> None:
    """Unpack + pack reproduces AutoAWQ's words bit for bit: our writer speaks its format."""
    with safe_open(str(AWQ_FIXTURE / "model.safetensors"), "pt") as f:
        for name in ("model.layers.0.self_attn.q_proj.qweight", "model.layers.1.mlp.down_proj.qzeros"):
            t = f.get_tensor(name)
            assert torch.equal(pack_awq(unpack_awq(t)), t)


def test_quantization_config_shape() -> None:
    assert quantization_config(128) | {"modules_to_not_convert": None} == {
        "quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm",
        "modules_to_not_convert": None,
    }


def _reference() -> dict:
    return json.loads((AWQ_FIXTURE / "reference_logits.json").read_text())


@needs_awq_fixture
@pytest.mark.parametrize("backend", ["reference", "int4pack"])
def test_fixture_logits_through_loader(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from leanserve.model.loader import load_model
    from leanserve.quant.awq import dense_logits

    monkeypatch.setenv("LEANSERVE_AWQ_BACKEND", backend)
    ref = _reference()
    model = load_model(AWQ_FIXTURE, torch.device("cpu"), torch.float32)
    logits = dense_logits(model, torch.tensor([ref["input_ids"]]))[0]
    expected = torch.tensor(ref["logits_last"])
    scale = expected.abs().max().item()
    assert (logits[-1] - expected).abs().max().item() <= 1e-2 * scale
    argmax = logits.argmax(-1)
    if backend == "reference":
        assert argmax.tolist() == ref["argmax_all"]
    else:
        # bf16 activations (~0.3% error) may flip near-ties: demand agreement where the top two of
        # the exact path differ by more than 1% of the logit scale.
        exact = torch.tensor(ref["argmax_all"])
        top2 = logits.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 1e-2 * scale
        assert torch.equal(argmax[clear], exact[clear]) and clear.sum() >= len(exact) - 3


@needs_awq_fixture
def test_fixture_through_engine(monkeypatch: pytest.MonkeyPatch) -> None:
    """The serving path: greedy top-1 at every prompt position and the first generated token."""
    from leanserve.engine.config import EngineConfig
    from leanserve.engine.llm_engine import LLMEngine
    from leanserve.quant.awq_linear import AWQLinear
    from leanserve.sampling_params import SamplingParams

    monkeypatch.setenv("LEANSERVE_AWQ_BACKEND", "reference")
    ref = _reference()
    engine = LLMEngine(EngineConfig(model=str(AWQ_FIXTURE), kv_cache_memory=1 << 20, device="cpu"))
    engine.add_request("r", ref["input_ids"], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))
    outputs = []
    while engine.has_unfinished_requests():
        outputs.extend(engine.step())
    prompt = next(o.prompt_logprobs for o in outputs if o.prompt_logprobs)
    top1 = [p.top[0][0] for p in prompt[1:]]  # prompt_logprobs[p + 1] is predicted at position p
    generated = [t for o in outputs for t in o.new_token_ids]
    assert top1 + generated == ref["argmax_all"]
    assert isinstance(engine.model.model.layers[0].mlp.down_proj, AWQLinear)
