"""Serving AWQ int4 linears: weights stay 4-bit in memory, the matmul dequantizes on the fly.

Checkpoint tensors land in AutoAWQ's layout (shards of a fused q/k/v or gate/up stacked along the output
dim). Once the whole model is loaded, ``finalize`` repacks each layer for the backend that runs it:

- ``int4pack`` (CPU): torch's own int4 kernel, ``aten._weight_int4pack_mm_for_cpu``. It needs its packed
  layout ``[out, in/2]`` uint8 and a ``[in/group, out, 2]`` table of (scale, offset) pairs with
  ``w = (q - 8) * scale + offset``. AWQ's ``w = (q - z) * s`` is the same affine map with
  ``scale = s`` and ``offset = (8 - z) * s``. Its fp32-activation path is a slow scalar loop (measured
  ~25x slower than fp32 MKL on torch 2.13), the bf16 one is vectorised (~2x faster than fp32 MKL at
  batch 1), so activations go in as bf16 and come back in the model dtype (~0.3% relative error, far
  below the int4 rounding itself).
- ``kmajor`` (CUDA, the default): repacked once to the K-major layout of ``leanserve.kernels.int4_gemv``
  (each output's inputs contiguous; the AWQ tensors are dropped), its GEMV for decode batches and
  dequantize-then-matmul for prefill. On an H200 its GEMV ran the 4096 -> 11008 layer at M = 1 in 9.3 us
  (fp16), against 20.3 for ``awq_gemm``'s and 24.9 for an fp16 matmul (RESULTS.md).
- ``triton`` (CUDA, where K or the group is not a multiple of 32): the fused dequantize-GEMM in
  ``leanserve.kernels.awq_gemm`` reads AWQ's layout as is.
- ``reference``: dequantize this layer's weight per call, then matmul (any device; for tests and shapes
  the others reject). Memory stays 4-bit; only one layer's fp32 weight exists at a time.

``LEANSERVE_AWQ_BACKEND=int4pack|triton|kmajor|reference`` forces one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from leanserve.kernels import reference
from leanserve.kernels.awq_reference import K_MAJOR_CHUNK, awq_gemm_reference, unpack_awq
from leanserve.model.layers import Linear
from leanserve.quant.awq_format import check_quantization_config

logger = logging.getLogger(__name__)

INT4PACK_GROUP_SIZES = (32, 64, 128, 256)


def int4pack_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu") and hasattr(
        torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"
    )


def awq_to_int4pack(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ tensors -> (packed ``[out, in/2]`` uint8, scales_and_zeros ``[in/group, out, 2]`` in ``dtype``).

    Only one layer's codes are unpacked (to int32, as the converter wants) at a time.
    """
    codes = unpack_awq(qweight).t().to(torch.int32).contiguous()  # [out, in]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    z = unpack_awq(qzeros).float()  # [in/g, out]
    s = scales.float()
    scales_and_zeros = torch.stack([s, (8.0 - z) * s], dim=-1).to(dtype).contiguous()
    return packed, scales_and_zeros


def int4pack_linear(
    x: torch.Tensor, packed: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """``x [M, in]`` through the packed weight; computes in ``scales_and_zeros.dtype``."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.to(scales_and_zeros.dtype), packed, group_size, scales_and_zeros
    )
    return y.to(x.dtype)


class AWQLinear(nn.Module):
    """An int4 ``Linear`` in AWQ's format, possibly several checkpoint matrices fused along its output."""

    def __init__(
        self,
        in_features: int,
        shard_sizes: list[int],
        bias: bool,
        group_size: int,
        dtype: torch.dtype,
        backend: str,
    ) -> None:
        super().__init__()
        out_features = sum(shard_sizes)
        group_size = in_features if group_size == -1 else group_size
        if in_features % group_size:
            raise ValueError(f"AWQ group size {group_size} does not divide in_features={in_features}")
        if any(size % 8 for size in shard_sizes):
            raise ValueError(f"AWQ packs 8 outputs per int32; shard sizes {shard_sizes} are not all x8")
        self.in_features, self.out_features = in_features, out_features
        self.shard_sizes = shard_sizes
        self.group_size = group_size
        self.backend = backend
        groups = in_features // group_size
        # Integer tensors are buffers: the loader casts floating *parameters* to the model dtype.
        self.register_buffer("qweight", torch.empty(in_features, out_features // 8, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features, dtype=torch.float16))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype)) if bias else None
        self.checkpoint_tensors = ["qweight", "qzeros", "scales"] + (["bias"] if bias else [])
        # Filled by finalize() for the int4pack backend ...
        self.register_buffer("packed", None)
        self.register_buffer("scales_and_zeros", None)
        # ... and for kmajor (int4_gemv.KMajorInt4's tensors).
        self.register_buffer("words", None)
        self.register_buffer("factors", None)

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        start = sum(self.shard_sizes[:shard])
        size = self.shard_sizes[shard]
        target: torch.Tensor = getattr(self, param_name)
        if param_name in ("qweight", "qzeros"):  # packed: 8 outputs per column
            start, size = start // 8, size // 8
        if param_name == "bias":
            expected = (size,)
            view = target[start : start + size]
        else:
            expected = (target.shape[0], size)
            view = target[:, start : start + size]
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"shard {shard} of {param_name}: expected {expected}, got {tuple(tensor.shape)}"
            )
        if param_name in ("qweight", "qzeros") and tensor.dtype != torch.int32:
            raise ValueError(f"{param_name} must be int32, got {tensor.dtype}")
        with torch.no_grad():
            view.copy_(tensor)

    @torch.no_grad()
    def finalize(self) -> None:
        """Repack for the backend once every shard is in; drops the AWQ tensors it no longer needs."""
        if self.backend == "kmajor":
            from leanserve.kernels.int4_gemv import KMajorInt4

            packed = KMajorInt4.from_awq(self.qweight, self.qzeros, self.scales, self.group_size)
            del self.qweight, self.qzeros, self.scales
            self.words, self.factors = packed.words, packed.factors  # buffers: they follow the module's .to()
            return
        if self.backend != "int4pack":
            return
        packed, sz = awq_to_int4pack(
            self.qweight, self.qzeros, self.scales, self.group_size, torch.bfloat16
        )
        del self.qweight, self.qzeros, self.scales
        self.packed, self.scales_and_zeros = packed, sz
        self._int4pack_call = (packed, self.group_size, sz, self.bias)

    # finalize()'s int4pack tensors again, as a plain attribute: buffers and parameters are reached through
    # nn.Module.__getattr__, and the general forward below spent ~8 us per call beside the kernel (18.8 vs
    # 11.5 us for the embedded model's qkv at 1 row), ~1 ms per decode step over its 120 int4 linears.
    # CPU-only and set after loading; moving the module afterwards is not supported.
    _int4pack_call: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor | None] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        call = self._int4pack_call
        if call is not None and x.dim() == 2:  # the serving path: a flat token batch
            packed, group, sz, bias = call
            y = int4pack_linear(x, packed, sz, group)
            return y if bias is None else y + bias
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.backend == "int4pack" and self.packed is not None:
            y = int4pack_linear(x2, self.packed, self.scales_and_zeros, self.group_size)
            if self.bias is not None:
                y = y + self.bias
        elif self.backend == "triton":
            from leanserve.kernels.awq_gemm import awq_gemm

            y = awq_gemm(x2, self.qweight, self.qzeros, self.scales, self.group_size, self.bias)
        elif self.backend == "kmajor" and self.words is not None:
            from leanserve.kernels.int4_gemv import KMajorInt4, int4_linear

            y = int4_linear(x2, KMajorInt4(self.words, self.factors, self.group_size), self.bias)
        else:
            y = awq_gemm_reference(x2, self.qweight, self.qzeros, self.scales, self.group_size, self.bias)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, shards={self.shard_sizes}, "
            f"group={self.group_size}, backend={self.backend}"
        )


def select_backend(device: torch.device, in_features: int, out_features: int, group_size: int) -> str:
    forced = os.environ.get("LEANSERVE_AWQ_BACKEND")
    if forced:
        return forced
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "reference"
        # The K-major GEMV reads each output's inputs in chunks of 32 that never straddle a group.
        if in_features % K_MAJOR_CHUNK == 0 and group_size % K_MAJOR_CHUNK == 0:
            return "kmajor"
        return "triton"
    if device.type == "cpu" and int4pack_available():
        # The CPU int4 kernel packs 16 outputs at a time and knows only these group sizes.
        if out_features % 16 == 0 and group_size in INT4PACK_GROUP_SIZES:
            return "int4pack"
    return "reference"


class AWQLinearFactory:
    """Builds the model's linears as ``AWQLinear`` (except ``modules_to_not_convert``); repacks at the end."""

    def __init__(
        self,
        quant_config: dict[str, Any],
        dtype: torch.dtype,
        device: torch.device,
        linear_op: Callable[..., torch.Tensor] = reference.linear,
    ) -> None:
        self.group_size = check_quantization_config(quant_config)
        self.skip = list(quant_config.get("modules_to_not_convert") or [])
        self.dtype = dtype
        self.device = torch.device(device)
        self.linear_op = linear_op  # the matmul of the modules left unquantized

    def __call__(self, in_features: int, shard_sizes: list[int], bias: bool, prefix: str) -> nn.Module:
        if any(name in prefix for name in self.skip):
            return Linear(in_features, shard_sizes, bias=bias, dtype=self.dtype, linear_op=self.linear_op)
        group = in_features if self.group_size == -1 else self.group_size
        backend = select_backend(self.device, in_features, sum(shard_sizes), group)
        return AWQLinear(in_features, shard_sizes, bias, group, self.dtype, backend)

    def finalize(self, model: nn.Module) -> None:
        backends: dict[str, int] = {}
        for module in model.modules():
            if isinstance(module, AWQLinear):
                module.finalize()
                backends[module.backend] = backends.get(module.backend, 0) + 1
        logger.info("AWQ int4 linears (group %d): %s", self.group_size, backends)


def awq_linear_factory(
    quant_config: dict[str, Any],
    dtype: torch.dtype,
    device: torch.device,
    linear_op: Callable[..., torch.Tensor] = reference.linear,
) -> AWQLinearFactory:
    return AWQLinearFactory(quant_config, dtype, device, linear_op)
