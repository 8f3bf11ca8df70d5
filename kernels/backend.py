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
