"""Serving int4: AWQ -> torch int4pack conversion, fused-shard loading, backend choice."""

from __future__ import annotations

import pytest
import torch
from leanserve.kernels.awq_reference import awq_gemm_reference, random_awq

from leanserve.quant.awq_format import quantize_weight
from leanserve.quant.awq_linear import (
    AWQLinear,
    awq_linear_factory,
    awq_to_int4pack,
    int4pack_available,
    int4pack_linear,
    select_backend,
)

needs_int4pack = pytest.mark.skipif(not int4pack_available(), reason="torch has no CPU int4pack ops")


@needs_int4pack
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4pack_conversion_is_exact_in_fp32(group: int) -> None:
    """scale = s, offset = (8 - z) * s: with fp32 scales_and_zeros the op equals dequantize-then-matmul."""
    qweight, qzeros, scales = random_awq(256, 48, group)
    packed, sz = awq_to_int4pack(qweight, qzeros, scales, group, torch.float32)
    assert packed.dtype == torch.uint8 and packed.shape == (48, 128)  # 4 bits per weight
    assert sz.shape == (256 // group, 48, 2)
    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    ref = awq_gemm_reference(x, qweight, qzeros, scales, group)
    torch.testing.assert_close(int4pack_linear(x, packed, sz, group), ref, rtol=1e-4, atol=1e-4)


@needs_int4pack
def test_int4pack_bf16_path_is_close() -> None:
    qweight, qzeros, scales = random_awq(576, 96, 64)
    packed, sz = awq_to_int4pack(qweight, qzeros, scales, 64, torch.bfloat16)
    x = torch.randn(3, 576, generator=torch.Generator().manual_seed(2))
    out = int4pack_linear(x, packed, sz, 64)
    ref = awq_gemm_reference(x, qweight, qzeros, scales, 64)
    assert out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()).item() < 1e-2


@pytest.mark.parametrize("backend", ["reference", "int4pack"])
def test_fused_shards_load_and_match(backend: str) -> None:
    if backend == "int4pack" and not int4pack_available():
        pytest.skip("torch has no CPU int4pack ops")
    gen = torch.Generator().manual_seed(3)
    shards = [torch.randn(size, 128, generator=gen) * 0.05 for size in (32, 16, 16)]
    layer = AWQLinear(128, [32, 16, 16], bias=True, group_size=32, dtype=torch.float32, backend=backend)
    bias = torch.randn(64, generator=gen)
    for i, w in enumerate(shards):
        for name, t in quantize_weight(w, 32).to_awq().items():
            layer.load_shard(name, i, t)
        layer.load_shard("bias", i, bias[sum((32, 16, 16)[:i]) :][: w.shape[0]])
    layer.finalize()
    if backend == "int4pack":
        assert not hasattr(layer, "qweight")  # the AWQ copy is dropped once repacked
        assert layer.packed is not None and layer.packed.dtype == torch.uint8
    x = torch.randn(2, 7, 128, generator=gen)
    dense = torch.cat([quantize_weight(w, 32).dequantize() for w in shards])
    expected = x @ dense.t() + bias
    out = layer(x)
    assert out.shape == (2, 7, 64)
    tol = 1e-5 if backend == "reference" else 2e-2
    assert ((out - expected).norm() / expected.norm()).item() < tol
    # 2-D input is the serving path (for int4pack: the forward that skips the module's attribute lookups)
    assert (layer._int4pack_call is not None) == (backend == "int4pack")
    assert torch.equal(layer(x.reshape(-1, 128)), out.reshape(-1, 64))


def test_load_shard_checks_shapes() -> None:
    layer = AWQLinear(64, [16, 16], bias=False, group_size=32, dtype=torch.float32, backend="reference")
    with pytest.raises(ValueError, match="shard 1 of qweight"):
        layer.load_shard("qweight", 1, torch.zeros(64, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="int32"):
        layer.load_shard("qzeros", 0, torch.zeros(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="does not divide"):
        AWQLinear(96, [16], bias=False, group_size=64, dtype=torch.float32, backend="reference")


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LEANSERVE_AWQ_BACKEND", raising=False)
    cpu = torch.device("cpu")
    expected = "int4pack" if int4pack_available() else "reference"
    assert select_backend(cpu, 576, 576, 64) == expected
    assert select_backend(cpu, 576, 40, 64) == "reference"  # the CPU kernel packs 16 outputs at a time
    assert select_backend(cpu, 576, 576, 48) == "reference"  # and knows only groups 32/64/128/256
    cuda = torch.device("cuda")  # only compared, never allocated on
    assert select_backend(cuda, 576, 576, 64) == "kmajor"
    assert select_backend(cuda, 576, 576, 48) == "triton"  # K-major chunks of 32 would straddle groups
    assert select_backend(cuda, 48, 576, 48) == "triton"
    monkeypatch.setenv("LEANSERVE_AWQ_BACKEND", "reference")
    assert select_backend(cpu, 576, 576, 64) == "reference"


def test_factory_validates_config() -> None:
    factory = awq_linear_factory({"quant_method": "awq", "bits": 4, "group_size": 32}, torch.float32, "cpu")
    layer = factory(64, [32, 32], False, "model.layers.0.mlp.gate_up_proj")
    assert isinstance(layer, AWQLinear) and layer.checkpoint_tensors == ["qweight", "qzeros", "scales"]
    with pytest.raises(NotImplementedError, match="only 4-bit"):
        awq_linear_factory({"quant_method": "awq", "bits": 8}, torch.float32, "cpu")
    def op(x, weight, bias=None):  # stands for the device's ModelOps.linear (not F.linear, the default)
        return torch.nn.functional.linear(x, weight, bias)

    skip = awq_linear_factory(
        {"quant_method": "awq", "group_size": 32, "modules_to_not_convert": ["mlp"]}, torch.float32, "cpu", op
    )
    plain = skip(64, [32], False, "model.layers.0.mlp.down_proj")
    assert not isinstance(plain, AWQLinear) and plain.linear_op is op  # the unquantized ones keep the device's op
