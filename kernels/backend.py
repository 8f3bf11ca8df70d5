"""Picks the kernel ops for a device: Triton kernels where they can run, torch references otherwise.

``get_model_ops`` is what a model calls once, at construction: Triton on CUDA, the references on any
other device. ``get_attention_ops`` also hands out the Triton attention ops on CPU under
``TRITON_INTERPRET=1``, for the kernel tests. Importing this module never imports triton (the CPU
server imports the kernels package without it); the Triton modules are imported only when selected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from . import reference
from ._checks import trusted_inputs  # noqa: F401  (re-exported: the model runner's way in)
from ._device import interpreter_enabled


@dataclass(frozen=True)
class AttentionOps:
    write_kv_cache: Callable[..., None]
    paged_decode_attention: Callable[..., torch.Tensor]
    paged_prefill_attention: Callable[..., torch.Tensor]
    # The rotary embedding and the cache write as one op (a decoder's step before attention)
    write_kv_cache_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    name: str  # "triton" or "reference", for logs


def triton_available() -> bool:
    """Triton can run here: it is importable and there is a CUDA device or the interpreter is on."""
    if not (interpreter_enabled() or torch.cuda.is_available()):
        return False  # decided without importing triton: the CPU server never pays for it
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def get_attention_ops(device: torch.device | str) -> AttentionOps:
    """Triton ops for CUDA tensors (or for any device under ``TRITON_INTERPRET=1``), else references."""
    device = torch.device(device)
    if triton_available() and (device.type == "cuda" or interpreter_enabled()):
        from .kv_cache import write_kv_cache, write_kv_cache_rotary
        from .paged_attention import paged_decode_attention, paged_prefill_attention

        return AttentionOps(write_kv_cache, paged_decode_attention, paged_prefill_attention, write_kv_cache_rotary,
                            "triton")
    return reference_attention_ops()


def reference_attention_ops() -> AttentionOps:
    return AttentionOps(
        reference.write_kv_cache,
        reference.paged_decode_attention,
        reference.paged_prefill_attention,
        reference.write_kv_cache_rotary,
        "reference",
    )


@dataclass(frozen=True)
class LayerOps:
    rms_norm: Callable[..., object]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    name: str


def reference_layer_ops() -> LayerOps:
    return LayerOps(reference.rms_norm, reference.silu_and_mul, "reference")


@dataclass(frozen=True)
class DecodeOps:
    """A decoder layer's fused forms for small decode batches (``LlamaDecoderLayer.forward_decode``):
    the MLP's gating in its up projection, the residual adds in the projections before them, and the
    norm before a linear (the CUDA forms keep the norm a kernel of its own: folded into the GEMV it was
    slower, ``gemv.py``). ``max_rows(device)``: the batch size up to which the model takes
    them (0: never); their semantics are ``reference.norm_linear`` & co."""

    norm_linear: Callable[..., torch.Tensor]
    norm_gated_linear: Callable[..., torch.Tensor]
    linear_residual: Callable[..., torch.Tensor]
    max_rows: Callable[[torch.device], int]


def reference_decode_ops() -> DecodeOps:
    """The reference forms, which the model never takes by itself (``max_rows`` 0): on a CPU they would
    only reorder the same ops. Tests raise ``max_rows`` to check the fused path against the other."""
    return DecodeOps(reference.norm_linear, reference.norm_gated_linear, reference.linear_residual, lambda d: 0)


@dataclass(frozen=True)
class ModelOps:
    """Every kernel a decoder calls: attention, the per-layer fused ops, the linear layers' matmul
    (``F.linear`` semantics) and the fused forms of a layer for small decode batches."""

    attention: AttentionOps
    layers: LayerOps
    linear: Callable[..., torch.Tensor] = reference.linear
    decode: DecodeOps = field(default_factory=reference_decode_ops)


def get_model_ops(device: torch.device | str) -> ModelOps:
    """Triton kernels for a model on CUDA; the torch references on any other device (the interpreter is
    for the kernel tests, never for a model). On CUDA, linears go through ``gemv.linear``: the Triton GEMV
    where it was measured faster (one row, with PDL), ``F.linear`` otherwise; for those same one-row
    batches the decoder takes its fused layer path (``DecodeOps``, ``gemv.decode_fusion_rows``)."""
    device = torch.device(device)
    if device.type == "cuda" and triton_available():
        from .fused_layers import rms_norm, silu_and_mul
        from .gemv import decode_fusion_rows, linear, linear_residual, norm_gated_linear, norm_linear

        layers = LayerOps(rms_norm, silu_and_mul, "triton")
        decode = DecodeOps(norm_linear, norm_gated_linear, linear_residual, decode_fusion_rows)
        return ModelOps(get_attention_ops(device), layers, linear, decode)
    return ModelOps(reference_attention_ops(), reference_layer_ops())
