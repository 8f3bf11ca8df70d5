"""Building blocks of a Llama-family decoder: norms, rotary embedding, linear layers with fused shards."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from leanserve.kernels import reference
from leanserve.kernels.backend import LayerOps, reference_layer_ops


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, ops: LayerOps | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.ops = ops or reference_layer_ops()  # chosen once by device (backend.get_model_ops)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``: ``(norm(x + residual), x + residual)`` in one fused pass."""
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Linear(nn.Linear):
    """``nn.Linear`` that can hold several checkpoint matrices stacked along its output dimension.

    Fusing q/k/v (and gate/up) into one matmul halves the number of GEMM launches per layer, which is
    what bounds small-batch decode on CPU. ``shard_sizes`` lists the output width of each stacked
    checkpoint tensor; ``load_shard`` copies one of them into place.
    """

    def __init__(
        self,
        in_features: int,
        shard_sizes: list[int],
        bias: bool,
        dtype: torch.dtype | None = None,
        linear_op: Callable[..., torch.Tensor] = reference.linear,
    ) -> None:
        super().__init__(in_features, sum(shard_sizes), bias=bias, dtype=dtype)
        self.shard_sizes = shard_sizes
        # The matmul, ``F.linear`` semantics: the device's ``backend.ModelOps.linear`` (the Triton GEMV
        # for decode-sized calls on CUDA), given by the linear factory.
        self.linear_op = linear_op

    packed: torch.Tensor | None = None

    def pack_for_cpu(self, batch_hint: int = 16, dtype: torch.dtype | None = None) -> None:
        """Keep the weight in oneDNN's blocked layout (see ``pack_cpu_weight``), in ``dtype`` (default:
        its own; bf16 halves the bytes, see ``packed_linear``); the plain copy is dropped."""
        self.packed = pack_cpu_weight(self.weight.detach(), batch_hint, dtype or self.weight.dtype)
        self.weight.data = torch.empty(0, dtype=self.weight.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        return self.linear_op(x, self.weight, self.bias)

    def load_shard(self, param_name: str, shard: int, tensor: torch.Tensor) -> None:
        param: torch.Tensor = getattr(self, param_name)
        start = sum(self.shard_sizes[:shard])
        size = self.shard_sizes[shard]
        if tensor.shape[0] != size or tensor.shape[1:] != param.shape[1:]:
            raise ValueError(
                f"shard {shard} of {param_name}: expected {(size, *param.shape[1:])}, "
                f"got {tuple(tensor.shape)}"
            )
        with torch.no_grad():
            param[start : start + size].copy_(tensor)


def cpu_packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def cpu_bf16_matmul_supported() -> bool:
    """Whether this torch build's oneDNN can run bf16 matmuls on this CPU at all (natively or not)."""
    return cpu_packing_available() and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def cpu_has_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """Whether this CPU multiplies bf16 in hardware: AVX512-BF16 or AMX-BF16 among ``cpuinfo``'s flags
    (False where it cannot be read: not Linux).

    There oneDNN's bf16 matmuls ran ~2x its fp32 ones on the 2-core AMD EPYC host (576 x 3072: 972
    against 478 GFLOP/s at 256 rows, 718 against 396 at 16, 0.037 against 0.065 ms at 1 row). Without
    those instructions oneDNN has to emulate the bf16 products, which no measurement here says would gain:
    fp32 stays the choice there.
    """
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool({"avx512_bf16", "amx_bf16"} & flags)
    except OSError:
        pass
    return False


def pack_cpu_weight(weight: torch.Tensor, batch_hint: int = 16, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reorder an ``[out, in]`` weight, as ``dtype``, into oneDNN's blocked layout for CPU matmuls.

    Measured on the 2-core host (fp32): 1.3-4x faster than ``F.linear`` for the decode-sized matmuls
    (8-100 rows) of the embedded model, 3x for its 49k-wide LM head; about equal at 1 row.
    """
    return torch.ops.mkldnn._reorder_linear_weight(weight.to(dtype).contiguous(), batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` through a ``pack_cpu_weight`` weight, returning ``x``'s dtype. A weight packed in
    another dtype than ``x`` (bf16 under an fp32 model) gets ``x`` rounded to its dtype; oneDNN
    accumulates in fp32 and rounds the output to bf16, and the bias is added after, in ``x``'s dtype."""
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if packed.dtype == x.dtype:
        out = torch.ops.mkldnn._linear_pointwise(rows, packed, bias, "none", [], "")
    else:
        out = torch.ops.mkldnn._linear_pointwise(rows.to(packed.dtype), packed, None, "none", [], "").to(x.dtype)
        if bias is not None:
            out = out + bias
    return out.reshape(*shape[:-1], out.shape[-1])


def int8_mm_supported(in_features: int) -> bool:
    """Whether ``int8_linear`` can serve a weight ``in_features`` wide.

    torch's AVX-512 kernel steps through the inputs 16 at a time with aligned loads and does not check
    the width: on torch 2.13 a width of 56, 72 or 104 returned garbage and 63 crashed the process.
    """
    return hasattr(torch.ops.aten, "_weight_int8pack_mm") and in_features % 16 == 0


def quantize_int8_per_channel(
    weight: torch.Tensor, chunk_rows: int = 4096
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8 of an ``[out, in]`` weight -> (``q`` int8 ``[out, in]``, bf16 ``[out]``).

    ``w ~= q * scale`` with ``scale = max|w_row| / 127`` rounded to bf16 first, so the codes are computed
    against the scale the kernel will actually use. Rows go ``chunk_rows`` at a time so no full-size
    float temporary is ever allocated beside the source weight.
    """
    out_features = weight.shape[0]
    q = torch.empty(weight.shape, dtype=torch.int8)
    scales = torch.empty(out_features, dtype=torch.bfloat16)
    with torch.no_grad():
        for start in range(0, out_features, chunk_rows):
            w = weight[start : start + chunk_rows].float()
            s = (w.abs().amax(dim=1) / 127).clamp_min(1e-12).to(torch.bfloat16)
            scales[start : start + len(w)] = s
            q[start : start + len(w)] = torch.round(w / s.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def int8_linear(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """``x [..., in]`` through an int8 weight (``quantize_int8_per_channel``); fp32 out.

    ``aten._weight_int8pack_mm`` wants activations in the scales' dtype. Its bf16 path is vectorised; its
    fp32 and fp16 ones are scalar loops (49152x576 head, 1 row, 2-core host: bf16 0.53 ms, fp32 8.95 ms,
    fp16 10.3 ms), so activations go in as bf16. It accumulates in fp32 and rounds the output to bf16.
    """
    shape = x.shape
    a = x.reshape(-1, shape[-1]).to(scales.dtype).contiguous()
    if a.data_ptr() % 64:  # the kernel's loads assume aligned rows (fresh allocations are)
        a = a.clone()
    out = torch.ops.aten._weight_int8pack_mm(a, q, scales)
    return out.reshape(*shape[:-1], out.shape[-1]).float()


LinearFactory = Any  # (in_features, shard_sizes, bias, prefix) -> nn.Module with load_shard


def default_linear_factory(dtype: torch.dtype, linear_op: Callable[..., torch.Tensor] = reference.linear):
    """Plain ``Linear`` layers whose matmul is ``linear_op`` (the model's ``ModelOps.linear``)."""

    def make(in_features: int, shard_sizes: list[int], bias: bool, prefix: str) -> nn.Module:
        return Linear(in_features, shard_sizes, bias=bias, dtype=dtype, linear_op=linear_op)

    return make


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """The tables of the rotary position embedding in the "rotate half" layout Hugging Face Llama
    checkpoints use. The decoder applies them in its attention's cache write
    (``AttentionOps.write_kv_cache_rotary``: on CUDA the same launch), with the semantics of
    ``reference.apply_rotary``."""

    def __init__(
        self,
        head_dim: int,
        max_position: int,
        base: float,
        scaling: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            inv_freq = inv_freq / scaling["factor"]
        elif kind == "llama3":
            inv_freq = _llama3_inv_freq(inv_freq, scaling)
        elif kind is not None:
            raise NotImplementedError(f"rope scaling {kind!r} is not supported (linear, llama3 are)")
        positions = torch.arange(max_position, dtype=torch.float64)
        freqs = torch.outer(positions, inv_freq)
        # cos/sin kept as [max_position, head_dim // 2]; the halves share them.
        self.register_buffer("cos", freqs.cos().float(), persistent=False)
        self.register_buffer("sin", freqs.sin().float(), persistent=False)
