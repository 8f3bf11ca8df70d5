"""L2 prefetch of the bytes the next kernel will read (sm_90's bulk prefetch), behind a ``PREFETCH``
constexpr.

A decode step's small GEMVs stream their weights at 40-50% of copy bandwidth: each kernel pays a ramp-up
and a tail with few loads in flight, and the attention and norm kernels between them read almost
nothing. A kernel given the next kernel's weights asks L2 for its share of them: every program splits
its share into one piece per thread, and each thread issues one ``cp.async.bulk.prefetch.L2`` (nothing
is waited for, and no data lands in registers; the address arithmetic costs the GEMV 8-18 registers on
sm_90). The next kernel then finds those bytes in L2. It is a hint: the results are the same with it or
without it, and the interpreter and pre-sm_90 GPUs compile it out.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import l2_prefetch_supported

# A prefetch larger than this is cut to its first bytes: an H100/H200 has 50 MB of L2, which the current
# kernel's own weights stream through too.
MAX_PREFETCH_BYTES = 24 << 20

# One bulk prefetch per thread, of ``$2`` bytes at ``$1`` (16-byte aligned, a multiple of 16); none where
# the thread's piece is empty.
_BULK_PREFETCH_PTX = tl.constexpr("""
{
.reg .pred p;
setp.ne.u32 p, $2, 0;
@p cp.async.bulk.prefetch.L2.global [$1], $2;
mov.u32 $0, 0;
}
""")


@triton.jit
def share_pieces(total_bytes, piece_bytes, program, PIECES: tl.constexpr):
    """``(start, size)`` in bytes of pieces ``program * PIECES ...``: ``piece_bytes`` each, the last ones cut
    at ``total_bytes`` (both multiples of 16, so every piece is a legal bulk prefetch), empty past it."""
    start = (program * PIECES + tl.arange(0, PIECES)).to(tl.int64) * piece_bytes
    size = tl.minimum(tl.maximum(total_bytes - start, 0), piece_bytes).to(tl.int32)
    return start, size


@triton.jit
def prefetch_share(base_ptr, total_bytes, piece_bytes, program, PIECES: tl.constexpr, PREFETCH: tl.constexpr):
    """Program ``program`` asks L2 for its pieces of the ``total_bytes`` bytes at ``base_ptr``
    (``PIECES`` = the program's threads, so one piece per thread)."""
    if PREFETCH:
        start, size = share_pieces(total_bytes, piece_bytes, program, PIECES)
        ptrs = base_ptr.to(tl.pointer_type(tl.int8)) + start
        tl.inline_asm_elementwise(_BULK_PREFETCH_PTX, "=r,l,r", [ptrs, size], dtype=tl.int32, is_pure=False,
                                  pack=1)


def prefetch_args(tensor: torch.Tensor | None, programs: int, pieces: int,
                  fallback: torch.Tensor) -> tuple[torch.Tensor, int, int, bool]:
    """A kernel's prefetch arguments ``(pointer, total bytes, piece bytes, PREFETCH)`` for ``tensor``
    shared by ``programs`` programs of ``pieces`` threads. ``fallback`` is a tensor the kernel already
    takes, on its device: the unused pointer when off. Off where the bulk prefetch cannot run: no
    tensor, one on another device, the interpreter, a GPU before sm_90, or a tensor that is not
    contiguous or 16-byte aligned."""
    usable = (
        tensor is not None and tensor.device == fallback.device and l2_prefetch_supported(tensor.device)
        and tensor.is_contiguous() and tensor.data_ptr() % 16 == 0
    )
    if not usable:
        return fallback, 0, 0, False
    total = min(tensor.numel() * tensor.element_size(), MAX_PREFETCH_BYTES) // 16 * 16
    piece = triton.cdiv(triton.cdiv(total, max(programs * pieces, 1)), 16) * 16
    return tensor, total, piece, total > 0
