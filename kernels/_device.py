"""Device facts the launchers size their grids by, and whether they may use programmatic dependent
launch."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Multiprocessors of a CUDA device; under the interpreter any small number exercises the same
    code paths."""
    if device.type == "cuda":
        return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())
    return 8


def interpreter_enabled() -> bool:
    """Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``, the CPU tests): no PTX, no PDL."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.cache
def _cuda_capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


@functools.cache
def _triton_has_gdc() -> bool:
    try:
        from ._pdl import gdc_wait
    except ImportError:  # no triton at all
        return False
    return gdc_wait is not None


def _compiled_on_sm90(device: torch.device) -> bool:
    """Compiled kernels (not the interpreter, which cannot run inline PTX) on a CUDA device of compute
    capability 9.0 or newer."""
    if device.type != "cuda" or interpreter_enabled():
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index) >= (9, 0)


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can be launched with programmatic dependent launch (PDL).

    PDL lets a kernel start while the one before it drains: it may load what the previous kernel does
    not write (weights) and then waits for it (``griddepcontrol.wait``) before touching anything else.
    It needs sm_90+ and a Triton that has the ``griddepcontrol`` wrappers.
    """
    return _compiled_on_sm90(device) and _triton_has_gdc()


def resolve_pdl(device: torch.device, requested: bool | None) -> bool:
    """A launch config's ``pdl`` setting on ``device``: None follows ``pdl_enabled``; True asks for PDL
    where it is supported; False turns it off."""
    return pdl_enabled(device) if requested is None else bool(requested) and pdl_supported(device)


def pdl_enabled(device: torch.device) -> bool:
    """Whether the launchers use PDL on ``device``: wherever it is supported, unless ``LEANSERVE_PDL=0``
    (read at each launch, so a benchmark can compare). On an H200 it took the 1.1B decode graph from
    1.332 to 1.156 ms with the Triton GEMV, 1.234 to 1.202 with cuBLAS (benchmarks/RESULTS.md)."""
    return os.environ.get("LEANSERVE_PDL", "1") != "0" and pdl_supported(device)
