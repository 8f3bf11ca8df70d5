"""Scratch buffers of the launchers: the split-K partials and counters of the GEMVs, dequantized weights.

A buffer is allocated once per (device, purpose, power-of-two size), zeroed, and never freed or
replaced: a CUDA graph captured earlier keeps its address. A launcher that needs its buffer zero at
every launch leaves it zero itself (the arrival counters, the AWQ sums). One stream at a time uses them:
launches are stream-ordered, and with PDL a program touches them only after its wait.
"""

from __future__ import annotations

import torch
import triton

_BUFFERS: dict[tuple[torch.device, str, int], torch.Tensor] = {}


def scratch(device: torch.device, purpose: str, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least ``numel`` elements for ``purpose``, zero when first allocated."""
    size = triton.next_power_of_2(max(numel, 1024))
    key = (device, purpose, size)
    buffer = _BUFFERS.get(key)
    if buffer is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(
                f"a new {purpose} workspace is needed inside a CUDA graph capture: run the largest "
                "batch once eagerly before capturing"
            )
        buffer = _BUFFERS[key] = torch.zeros(size, dtype=dtype, device=device)
    if buffer.dtype != dtype:
        raise ValueError(f"{purpose} workspaces are {buffer.dtype}, asked for {dtype}")
    return buffer


def scratch_matrix(device: torch.device, purpose: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """``scratch`` as a ``[rows, cols]`` matrix (a dequantized weight, for instance)."""
    return scratch(device, purpose, rows * cols, dtype)[: rows * cols].view(rows, cols)


def buffers(purpose: str) -> list[torch.Tensor]:
    """Every buffer allocated for ``purpose`` (tests check what launches leave in them)."""
    return [buffer for (_, name, _), buffer in _BUFFERS.items() if name == purpose]
