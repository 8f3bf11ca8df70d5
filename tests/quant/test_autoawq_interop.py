"""Cross-check against AutoAWQ itself, when it is installed (it is optional: deprecated, not a dependency).

AutoAWQ's package ``__init__`` imports ``datasets`` for its calibration downloads, which we never use; a
stand-in is registered when ``datasets`` is absent so that only its packing code is exercised.
"""

from __future__ import annotations

import importlib.util
import sys
import types

import pytest
import torch
from leanserve.kernels.awq_reference import awq_gemm_reference
from torch import nn

from leanserve.quant.awq_format import quantize_weight

if importlib.util.find_spec("awq") is None:
    pytest.skip("autoawq is not installed", allow_module_level=True)
if importlib.util.find_spec("datasets") is None:
    sys.modules["datasets"] = types.SimpleNamespace(load_dataset=None)
gemm = pytest.importorskip("awq.modules.linear.gemm")


@pytest.mark.parametrize("group", [32, 128])
def test_autoawq_packs_like_us(group: int) -> None:
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)) * 0.05
    ours = quantize_weight(w, group)
    linear = nn.Linear(256, 64, bias=False)
    # AutoAWQ packs the already fake-quantized weight (its pseudo_quantize_tensor output).
    linear.weight.data.copy_(ours.dequantize())
    theirs = gemm.WQLinear_GEMM.from_linear(
        linear, 4, group, scales=ours.scales.t().float(), zeros=ours.zeros.t().float()
    )  # AutoAWQ passes them input-group-major, as stored
    tensors = ours.to_awq()
    assert torch.equal(theirs.qweight, tensors["qweight"])
    assert torch.equal(theirs.qzeros, tensors["qzeros"])
    assert torch.equal(theirs.scales, tensors["scales"])


def test_autoawq_dequantizes_our_tensors_like_us() -> None:
    from awq.utils.packing_utils import dequantize_gemm

    w = torch.randn(32, 128, generator=torch.Generator().manual_seed(1)) * 0.05
    t = quantize_weight(w, 64).to_awq()
    theirs = dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], 4, 64).float()  # [in, out]
    x = torch.eye(128)
    ours = awq_gemm_reference(x, t["qweight"], t["qzeros"], t["scales"], 64)
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=1e-4)  # theirs multiplies in fp16
