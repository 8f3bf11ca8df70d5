"""Programmatic dependent launch (PDL) inside the kernels, behind a ``USE_PDL`` constexpr.

A kernel launched with PDL may start before the previous kernel on the stream has finished. Two rules
keep that correct:

- before ``pdl_wait`` a program only *loads* data no kernel of the step writes (weights, norm weights);
  it stores nothing, since its output buffer may be memory the previous kernel still reads;
- every program reaches ``pdl_wait`` before it exits, so a kernel never completes ahead of the one it
  depends on (the next kernel's wait then covers the whole chain).

``pdl_launch_dependents`` lets the next kernel be scheduled once every program of this one has called
it; it is called right after the wait so that at most two kernels overlap. With ``USE_PDL`` False
(the interpreter, CPUs, GPUs before sm_90, and with ``LEANSERVE_PDL=0``) both are compiled out.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # an older Triton: _device.pdl_enabled is then always False
    gdc_launch_dependents = gdc_wait = None


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_wait()


@triton.jit
def pdl_launch_dependents(USE_PDL: tl.constexpr):
    if USE_PDL:
        gdc_launch_dependents()


def pdl_launch(enabled: bool) -> dict[str, bool]:
    """Launch keywords of a kernel with a ``USE_PDL`` constexpr: the constexpr, and ``launch_pdl=True``
    only when enabled (off, the launch is exactly as it was before PDL)."""
    return {"USE_PDL": enabled, "launch_pdl": True} if enabled else {"USE_PDL": False}
