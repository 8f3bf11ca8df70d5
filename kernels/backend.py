"""Picks the attention ops for a device: Triton kernels where they can run, torch references otherwise.

Importing this module never imports triton (the CPU server imports the kernels package without it);
the Triton modules are imported only when ``get_attention_ops`` selects them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import reference
from ._checks import trusted_inputs  # noqa: F401  (re-exported: the model runner's way in)


@dataclass(frozen=True)
class AttentionOps:
    write_kv_cache: Callable[..., None]
    paged_decode_attention: Callable[..., torch.Tensor]
    paged_prefill_attention: Callable[..., torch.Tensor]
    name: str  # "triton" or "reference", for logs


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
        from .kv_cache import write_kv_cache
        from .paged_attention import paged_decode_attention, paged_prefill_attention

        return AttentionOps(write_kv_cache, paged_decode_attention, paged_prefill_attention, "triton")
    return AttentionOps(
        reference.write_kv_cache,
        reference.paged_decode_attention,
        reference.paged_prefill_attention,
        "reference",
    )


@dataclass(frozen=True)
class LayerOps:
    rms_norm: Callable[..., object]
    apply_rotary: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    name: str


_layer_ops: dict[str, LayerOps] = {}


def get_layer_ops(device: torch.device | str) -> LayerOps:
    """Fused RMSNorm / rotary / SiLU-and-multiply: Triton on CUDA, torch references elsewhere (memoised per device type:
    the model asks for them on every layer call)."""
    kind = torch.device(device).type
    if kind not in _layer_ops:
        if kind == "cuda" and triton_available():
            from .fused_layers import apply_rotary, rms_norm, silu_and_mul

            _layer_ops[kind] = LayerOps(rms_norm, apply_rotary, silu_and_mul, "triton")
        else:
            _layer_ops[kind] = reference_layer_ops()
    return _layer_ops[kind]


def reference_layer_ops() -> LayerOps:
    return LayerOps(reference.rms_norm, reference.apply_rotary, reference.silu_and_mul, "reference")


def override_layer_ops(device: torch.device | str, ops: LayerOps | None) -> None:
    """Pin the layer ops for a device type (None: back to the default choice). For benchmarks that
    compare the fused kernels with the unfused torch ops in one process."""
    kind = torch.device(device).type
    _layer_ops.pop(kind, None)
    if ops is not None:
        _layer_ops[kind] = ops
