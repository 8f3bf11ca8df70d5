from __future__ import annotations

import pytest
import torch
from leanserve.kernels import reference

from leanserve.model.layers import (
    Linear,
    RotaryEmbedding,
    cpu_packing_available,
    int8_linear,
    int8_mm_supported,
    quantize_int8_per_channel,
)
from tests.conftest import needs_onednn_bf16


@pytest.mark.skipif(not cpu_packing_available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("rows", [1, 7, 16, 130])
def test_packed_linear_matches_plain(rows: int) -> None:
    torch.manual_seed(rows)
    layer = Linear(48, [32, 16], bias=True)
    x = torch.randn(rows, 48)
    expected = layer(x)
    layer.pack_for_cpu()
    assert layer.weight.numel() == 0  # the plain copy is gone
    assert torch.allclose(layer(x), expected, atol=1e-5, rtol=1e-5)


def test_load_shard_places_each_checkpoint_tensor() -> None:
    layer = Linear(4, [2, 3], bias=False)
    layer.load_shard("weight", 1, torch.full((3, 4), 7.0))
    layer.load_shard("weight", 0, torch.full((2, 4), 5.0))
    assert layer.weight[:2].eq(5).all() and layer.weight[2:].eq(7).all()
    with pytest.raises(ValueError):
        layer.load_shard("weight", 0, torch.zeros(3, 4))


def test_rotary_matches_transformers() -> None:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    config = LlamaConfig(hidden_size=64, num_attention_heads=4, max_position_embeddings=128, rope_theta=10000.0)
    theirs = LlamaRotaryEmbedding(config)
    ours = RotaryEmbedding(16, 128, 10000.0)
    positions = torch.tensor([0, 5, 77, 127])
    q, k = torch.randn(4, 4, 16), torch.randn(4, 2, 16)
    cos, sin = theirs(q, positions[None])
    q_ref, k_ref = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_ours, k_ours = reference.apply_rotary(q, k, positions, ours.cos, ours.sin)  # what the decoder runs
    assert torch.allclose(q_ours, q_ref[0].transpose(0, 1), atol=1e-5)
    assert torch.allclose(k_ours, k_ref[0].transpose(0, 1), atol=1e-5)


def test_int8_per_channel_quantization_round_trips() -> None:
    torch.manual_seed(0)
    w = torch.randn(300, 64) * torch.rand(300, 1) * 0.1
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, s = quantize_int8_per_channel(w, chunk_rows=7)  # chunks that do not divide the rows
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert s.dtype == torch.bfloat16 and s.shape == (300,)
    assert q.abs().max() <= 127 and q[5].eq(0).all()
    nonzero = torch.arange(300) != 5
    assert (q[nonzero].abs().amax(dim=1) >= 126).all()  # each row uses its full range
    step = s.float()[:, None]
    assert ((q.float() * step - w).abs() <= 0.5 * step * 1.01).all()  # within half a step of the scale used
    q2, s2 = quantize_int8_per_channel(w)
    assert torch.equal(q, q2) and torch.equal(s, s2)


@pytest.mark.skipif(not int8_mm_supported(64), reason="this torch build has no int8 weight-only matmul")
@pytest.mark.parametrize("rows", [1, 3, 8, 13])
def test_int8_linear_within_its_error_bound(rows: int) -> None:
    torch.manual_seed(rows)
    w = torch.randn(304, 64) * 0.05
    x = torch.randn(rows, 64) * 3
    q, s = quantize_int8_per_channel(w)
    ref = x @ w.t()
    got = int8_linear(x.view(1, rows, 64), q, s)
    assert got.shape == (1, rows, 304) and got.dtype == torch.float32
    # weight rounding (half a step per weight) + bf16 rounding of the activations and of the output
    bound = 0.5 * x.abs().sum(-1, keepdim=True) * s.float()[None, :]
    bound = bound + 2**-8 * (x.abs() @ w.abs().t() + ref.abs()) + 1e-6
    assert ((got[0] - ref).abs() <= bound).all()
    assert not torch.allclose(got[0], ref, atol=1e-6)  # it is the int8 weight, not the float one


def test_int8_mm_supported_widths() -> None:
    # torch's kernel reads inputs 16 at a time and does not check: other widths gave garbage or crashed.
    assert not int8_mm_supported(56) and not int8_mm_supported(63)
    assert int8_mm_supported(576) == hasattr(torch.ops.aten, "_weight_int8pack_mm")


def test_model_routes_every_linear_and_the_lm_head_through_ops_linear(tmp_path) -> None:
    import torch.nn.functional as F
    from leanserve.kernels import backend

    from leanserve.model.config import ModelConfig
    from leanserve.model.layers import default_linear_factory
    from leanserve.model.llama import LlamaForCausalLM
    from tests.conftest import build_tiny_checkpoint

    assert backend.get_model_ops("cpu").linear is F.linear  # the CPU path is the plain matmul
    config = ModelConfig.from_pretrained(build_tiny_checkpoint(tmp_path, "llama"))
    shapes = []

    def recording_linear(x, weight, bias=None):
        shapes.append(tuple(weight.shape))
        return F.linear(x, weight, bias)

    ops = backend.get_model_ops("cpu")
    ops = backend.ModelOps(ops.attention, ops.layers, recording_linear)
    model = LlamaForCausalLM(config, default_linear_factory(torch.float32, ops.linear), ops)
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert len(linears) == 4 * config.num_hidden_layers
    assert all(m.linear_op is recording_linear for m in linears)
    x = torch.randn(2, config.hidden_size)
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert torch.equal(qkv(x), F.linear(x, qkv.weight, qkv.bias))
    logits = model.compute_logits(x)
    assert shapes == [tuple(qkv.weight.shape), (config.vocab_size, config.hidden_size)]
    assert logits.shape == (2, config.vocab_size) and logits.dtype == torch.float32


@needs_onednn_bf16
@pytest.mark.parametrize("rows", [1, 16, 130])
def test_bf16_packed_linear_is_one_bf16_rounding_from_the_emulation(rows: int) -> None:
    """An fp32 layer packed in bf16: x and the weight rounded to bf16, fp32 accumulation, the output
    rounded to bf16, then the fp32 bias. Equal to that emulation within one bf16 step of the output
    (the accumulation order differs), and within bf16's error of the exact fp32 layer."""
    torch.manual_seed(rows)
    layer = Linear(96, [64, 32], bias=True)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(rows, 96)
    exact = layer(x)
    emulated = torch.nn.functional.linear(x.bfloat16().float(), layer.weight.bfloat16().float())
    emulated = emulated.bfloat16().float() + layer.bias
    layer.pack_for_cpu(dtype=torch.bfloat16)
    assert layer.packed is not None and layer.packed.dtype == torch.bfloat16 and layer.weight.numel() == 0
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == exact.shape
    step = (emulated - layer.bias).abs() * 2**-7 + 1e-6  # one bf16 ulp of the rounded product, at most
    assert ((got - emulated).abs() <= step).all()
    assert (got - exact).abs().max() <= 0.02 * exact.abs().max()
    assert not torch.equal(got, exact)  # it did run in bf16


def test_native_bf16_is_read_from_the_cpu_flags(tmp_path) -> None:
    from leanserve.model.layers import cpu_has_native_bf16

    for flags, want in [("fpu avx512f avx512_bf16 sse", True), ("fpu amx_tile amx_bf16", True),
                        ("fpu avx512f avx512bw avx512_vnni", False)]:
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nmodel name\t: x\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
        assert cpu_has_native_bf16(str(info)) is want
    assert cpu_has_native_bf16(str(tmp_path / "missing")) is False
