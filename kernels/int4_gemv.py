"""Int4 GEMV over K-major weights: ``y [M, N] = x [M, K] @ W [K, N] (+ bias)`` for decode-sized ``M``.

AWQ's checkpoint layout packs eight *outputs* per word (``awq_reference``), so a GEMV over it
(``awq_gemm``'s) gives each thread eight outputs per word and must sum every output across the threads
that hold its K. The K-major repack (``awq_reference.repack_k_major``, once at load) stores each output
row's inputs contiguous, as ``nn.Linear`` does, and this kernel is shaped like the dense GEMV
(``gemv.py``):

- each program owns ``BLOCK_N`` output rows and walks K in tiles of ``CHUNKS`` chunks (a chunk is 32
  inputs, four words, one 16-byte load). Every thread loads one chunk of every row of the tile, so it
  has ``BLOCK_N`` independent 16-byte loads in flight, and the x it needs (the same chunk for every
  row) is loaded once, in four 16-byte loads: the unpack yields nibbles j and j + 4 of a word as one
  pair, the repack puts their inputs side by side, and pair j of a thread's four words covers 8
  consecutive inputs;
- the nibbles become ``1 + q/16`` in registers (``awq_gemm._word_plus_one``: two nibbles per LOP3 when
  compiled). A chunk lies inside one group, so per row and chunk ``t = sum x (1 + q/16)`` and, shared by
  all rows, ``u = sum x``; the chunk adds ``16 s (t - (1 + z/16) u)``, which is ``sum x (q - z) s``. One
  32-bit load per row and chunk brings both fp16 factors;
- nothing crosses threads until the end: one reduction per program, over the chunks;
- with PDL (``_pdl.py``) a program loads its first tile of words and factors, waits for the previous
  kernel, then reads x.

The row stride is passed as chunks per row and multiplied by four in the kernel, so Triton can prove
every row 16-byte aligned whatever K is. Each program takes every row of x (``M <= 8``): the nibbles are
unpacked once and each row of x adds only its products (fewer output rows per program as ``M`` grows).
It is what AWQ models serve through on CUDA (``quant/awq_linear.py``'s ``kmajor`` backend): on an H200,
at the bar's layer (4096 -> 11008, M = 1), 9.3 us with the fp16-pair math against ``awq_gemm``'s GEMV
at 20.3 and an fp16 ``torch.matmul`` at 24.9 (``benchmarks/quant.py``, RESULTS.md).
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from . import _checks
from ._device import interpreter_enabled, resolve_pdl
from ._pdl import pdl_launch, pdl_launch_dependents, pdl_wait
from ._workspace import scratch_matrix
from .awq_gemm import ONE_BITS, _use_asm, _word_plus_one, nibble_pairs_ptx
from .awq_reference import K_MAJOR_CHUNK

INT4_GEMV_MAX_M = 8  # rows of x, all in each program


@dataclasses.dataclass(frozen=True)
class Int4GemvConfig:
    """Launch parameters (benchmarks sweep them)."""

    # Output rows per program: 16-byte loads in flight per thread and tile. None: with the fp32 math 8 up
    # to 2 rows of x, 4 up to 4, 2 above; with half2 8 up to 4, 4 up to 6, 2 above (each row of x adds its
    # products to every output row's registers); halved for M > 1 when K takes more than one tile.
    block_n: int | None = None
    num_warps: int = 4
    chunks_per_thread: int = 1  # chunks each thread takes per tile (K per tile = 32 * 32 * warps * this)
    unpack: str | None = None  # "asm" / "shift" as awq_gemm.UNPACK; None: its default
    pdl: bool | None = None  # None: as _device.pdl_enabled
    maxnreg: int | None = None  # a register cap for ptxas
    # "fp32": nibbles and x widened to fp32, one FFMA per weight; "half2" (compiled, fp16 x only): the
    # products in fp16 pairs (``_HALF2_UNPACK_PTX``), 920 instead of 1144 SASS instructions per thread at
    # the default tile on sm_90. None: "half2" wherever it can run (``default_math``): on an H200 it took
    # the bar's layer (4096 -> 11008, M = 1) from 11.0 to 9.2 us, relative error 3.8e-4 against 2.0e-4.
    math: str | None = None


# PTX (sm_90) of the "half2" math, in two steps so that a word is unpacked once for every row of x:
# a word's eight nibbles as four fp16 pairs (q_j - z) / 16, (q_j+4 - z) / 16 (awq_gemm's nibble pairs
# 1 + q/16, then one packed subtraction of the zero pair leaves exact values) ...
_HALF2_UNPACK_PTX = tl.constexpr(
    "{\n.reg .b32 t<4>;\n" + nibble_pairs_ptx("$4") + "".join(f"sub.f16x2 ${j}, t{j}, $5;\n" for j in range(4))
    + "}\n"
)
# ... then, per row of x, the word's eight products with x's matching fp16 pairs summed in one fp16x2
# chain (four terms per half: the two halves' errors stay near fp16 rounding) and the halves added in fp32.
_HALF2_DOT_PTX = tl.constexpr("""
{
.reg .b32 a;
.reg .b16 lo, hi;
.reg .f32 flo, fhi;
mul.rn.f16x2 a, $1, $5;
fma.rn.f16x2 a, $2, $6, a;
fma.rn.f16x2 a, $3, $7, a;
fma.rn.f16x2 a, $4, $8, a;
mov.b32 {lo, hi}, a;
cvt.f32.f16 flo, lo;
cvt.f32.f16 fhi, hi;
add.f32 $0, flo, fhi;
}
""")


@dataclasses.dataclass(frozen=True)
class KMajorInt4:
    """A linear's int4 weight in the K-major layout (``awq_reference.repack_k_major``)."""

    words: torch.Tensor  # int32 [N, K / 8]
    factors: torch.Tensor  # int32 [N, K / group]: fp16 16*scale | fp16 (1 + zero/16) << 16
    group_size: int

    @classmethod
    def from_awq(cls, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                 group_size: int) -> KMajorInt4:
        from .awq_reference import repack_k_major

        return cls(*repack_k_major(qweight, qzeros, scales, group_size), group_size)

    @property
    def out_features(self) -> int:
        return self.words.shape[0]

    @property
    def in_features(self) -> int:
        return self.words.shape[1] * 8


@triton.jit
def _load(ptrs, mask, HAS_MASK: tl.constexpr):
    """``ptrs``, masked (zeros where ``mask`` fails) only if ``HAS_MASK``: unmasked loads for a whole tile."""
    if HAS_MASK:
        return tl.load(ptrs, mask=mask, other=0)
    return tl.load(ptrs)


@triton.jit
def _x_pair_plane(x_ptrs, x_mask, J: tl.constexpr, HAS_MASK: tl.constexpr):
    """Inputs ``32c + 8J + 2s + h`` as fp32 ``[M, 1, W]`` for h = 0 and h = 1 (nibbles ``J`` and ``J + 4``
    of word ``s``): one 16-byte load of 8 consecutive inputs per thread (fp16/bf16), split in registers."""
    v = _load(x_ptrs + 8 * J, x_mask, HAS_MASK).to(tl.float32)
    return tl.split(tl.reshape(v, [v.shape[0], 1, v.shape[2] // 2, 2]))


@triton.jit
def _chunk_terms(words, factors, x_ptrs, x_mask, one_bits, HAS_MASK: tl.constexpr, ASM: tl.constexpr):
    """``[M_PAD, BLOCK_N, CHUNKS]``: each x row's and output row's ``sum x (q - z) s`` over each chunk of
    the tile.

    ``words`` ``[1, BLOCK_N, 4 * CHUNKS]`` (unpacked once for every row of x); ``factors`` ``[1, BLOCK_N,
    CHUNKS]``, the fp16 pair of each output row's group; ``x_ptrs`` ``[M_PAD, 1, 8 * CHUNKS]`` points at
    input ``32c + e`` for the ``e``-th of a chunk's first 8 (pair ``j`` adds ``8j``): 8 consecutive
    inputs per thread and row of x.
    """
    n0, n1, n2, n3, n4, n5, n6, n7 = _word_plus_one(words, one_bits, ASM)
    lo0, hi0 = _x_pair_plane(x_ptrs, x_mask, 0, HAS_MASK)
    lo1, hi1 = _x_pair_plane(x_ptrs, x_mask, 1, HAS_MASK)
    lo2, hi2 = _x_pair_plane(x_ptrs, x_mask, 2, HAS_MASK)
    lo3, hi3 = _x_pair_plane(x_ptrs, x_mask, 3, HAS_MASK)
    t = lo0 * n0 + lo1 * n1 + lo2 * n2 + lo3 * n3 + hi0 * n4 + hi1 * n5 + hi2 * n6 + hi3 * n7  # [M, BLOCK_N, W]
    u = lo0 + lo1 + lo2 + lo3 + hi0 + hi1 + hi2 + hi3  # [M, 1, W]
    # A thread's four words are one chunk: these sums stay in registers.
    t = tl.sum(tl.reshape(t, [t.shape[0], t.shape[1], t.shape[2] // 4, 4]), axis=3)
    u = tl.sum(tl.reshape(u, [u.shape[0], 1, u.shape[2] // 4, 4]), axis=3)
    scale16 = factors.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    zero = (factors >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return scale16 * (t - zero * u)


@triton.jit
def _chunk_terms_half2(words, factors, x_ptrs, x_mask, HAS_MASK: tl.constexpr):
    """``_chunk_terms`` with the products in fp16 pairs (fp16 x; compiled only): the zero point is taken
    off the nibbles before the products, so no ``sum x`` term is needed. ``x_ptrs`` is an int32 tile
    ``[M_PAD, 1, 4 * CHUNKS]`` over x's fp16 pairs: pair ``16c + s`` (pair plane ``j`` adds ``4j``) holds
    inputs ``32c + 8j + 2s`` and ``+ 1``, the partners of word ``s``'s nibbles ``j`` and ``j + 4``."""
    # Each word's zero point (1 + z/16) copied into both halves: a chunk's four words share it (the
    # broadcast stays in registers, as in _int4_dequant_kernel).
    zero = ((factors >> 16) & 0xFFFF) | (factors & -65536)
    zero = tl.reshape(tl.broadcast_to(zero[:, :, :, None], [1, words.shape[1], words.shape[2] // 4, 4]),
                      [1, words.shape[1], words.shape[2]])
    h0, h1, h2, h3 = tl.inline_asm_elementwise(
        _HALF2_UNPACK_PTX, "=r,=r,=r,=r,r,r", [words, zero], dtype=(tl.int32,) * 4, is_pure=True, pack=1)
    x0, x1 = _load(x_ptrs, x_mask, HAS_MASK), _load(x_ptrs + 4, x_mask, HAS_MASK)
    x2, x3 = _load(x_ptrs + 8, x_mask, HAS_MASK), _load(x_ptrs + 12, x_mask, HAS_MASK)
    t = tl.inline_asm_elementwise(
        _HALF2_DOT_PTX, "=r,r,r,r,r,r,r,r,r", [h0, h1, h2, h3, x0, x1, x2, x3],
        dtype=tl.float32, is_pure=True, pack=1)  # [M, BLOCK_N, W]
    t = tl.sum(tl.reshape(t, [t.shape[0], t.shape[1], t.shape[2] // 4, 4]), axis=3)
    scale16 = factors.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return scale16 * t


@triton.jit
def _load_tile(w_tile, f_tile, c0, KC, offs_w, offs_c, GROUP_CHUNKS: tl.constexpr, EVEN_K: tl.constexpr):
    """The words ``[1, BLOCK_N, 4 * CHUNKS]`` and factors ``[1, BLOCK_N, CHUNKS]`` of the tile at chunk ``c0``."""
    words = _load(w_tile + c0 * 4, (c0 * 4 + offs_w < KC * 4)[None, None, :], not EVEN_K)
    # The group of each chunk of the tile, (c0 + c) // GROUP_CHUNKS: a tile need not start on a group
    # boundary (a 384-wide group is 12 chunks, a tile a power of two).
    factors = _load(f_tile + ((c0 + offs_c) // GROUP_CHUNKS)[:, None], (c0 + offs_c < KC)[:, None], not EVEN_K)
    return words, tl.trans(factors)[None, :, :]


@triton.jit
def _int4_gemv_kernel(
    x_ptr, w_ptr, f_ptr, bias_ptr, y_ptr,
    M, N, KC, G, stride_xm, stride_ym, one_bits,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, GROUP_CHUNKS: tl.constexpr,
    EVEN_K: tl.constexpr, ONE_TILE: tl.constexpr, HAS_BIAS: tl.constexpr, ASM: tl.constexpr,
    USE_PDL: tl.constexpr, HALF2: tl.constexpr,
):
    """One program: ``BLOCK_N`` outputs of every row of x (``M``, padded to ``M_PAD``), over all of K
    (``KC`` chunks, ``G`` groups); the nibbles are unpacked once for all rows of x.

    Tiles are 3-d, ``[rows of x, output rows, words]``: the words ``[1, BLOCK_N, W]`` and x ``[M_PAD, 1,
    W]``, each built as a 3-d pointer tensor whose only contiguous dim is the last, so both loads get
    the layout that spreads every thread over the words (16-byte vectors) and keeps both row dims in
    registers, and the products broadcast with no conversion. (Expanding 2-d loads instead gave a 3-d
    layout of one element per thread and a shared-memory trip per plane; a 3-d ``[rows, chunks, 4]``
    word tile left rows and chunks tied for the threads, and Triton 3.6 put them along the rows.)
    """
    WORDS: tl.constexpr = CHUNKS * 4
    pid_n = tl.program_id(0)
    offs_m = tl.arange(0, M_PAD)
    x_rows = tl.minimum(offs_m, M - 1).to(tl.int64)  # padding rows read row M - 1, never stored
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = tl.minimum(offs_n, N - 1).to(tl.int64)  # clamped rows read real data, never stored
    offs_w = tl.arange(0, WORDS)
    offs_c = tl.arange(0, CHUNKS)
    w_tile = w_ptr + w_rows[None, :, None] * (KC * 4) + offs_w[None, None, :]
    # Built [CHUNKS, BLOCK_N] and transposed where loaded: Triton 3.6's coalescing, with no contiguous dim
    # to order by, puts the threads along the first dim, here the chunks, which is how the sums over
    # each thread's words come out; built [BLOCK_N, CHUNKS], the load went through shared memory twice
    # per tile, and ptxas issued it only after the arithmetic.
    f_tile = f_ptr + w_rows[None, :] * G
    if HALF2:  # x's fp16 pairs as int32: 16 pairs a chunk, pair plane j at 4j
        x_tile = (x_ptr.to(tl.pointer_type(tl.int32), bitcast=True) + x_rows[:, None, None] * (stride_xm // 2)
                  + ((offs_w // 4) * 16 + offs_w % 4)[None, None, :])
        offs_x = offs_w
    else:  # 8 consecutive inputs a thread (pair plane j at 8j): x index 32c + e
        offs_x = tl.arange(0, 2 * WORDS)
        x_tile = x_ptr + x_rows[:, None, None] * stride_xm + ((offs_x // 8) * 32 + offs_x % 8)[None, None, :]
    X_CHUNK: tl.constexpr = 32 - 16 * HALF2  # x_tile's step per chunk: 32 inputs, or 16 pairs
    X_PER_CHUNK: tl.constexpr = 8 - 4 * HALF2  # x_tile's elements per chunk: 8 inputs, or 4 pairs

    # The first tile: weights only, so it may stream while the previous kernel drains.
    words, factors = _load_tile(w_tile, f_tile, 0, KC, offs_w, offs_c, GROUP_CHUNKS, EVEN_K)
    if USE_PDL:
        pdl_wait(USE_PDL)
        pdl_launch_dependents(USE_PDL)
    else:
        # Without the wait between them, ptxas (3.6, sm_90) spread the word loads through the arithmetic,
        # two of eight in flight at the start; loads are not moved across a barrier.
        tl.debug_barrier()
    if ONE_TILE:  # all of K in one tile (the default launch at K <= 4096): straight-line code
        x_mask = (offs_x < KC * X_PER_CHUNK)[None, None, :]
        if HALF2:
            acc = _chunk_terms_half2(words, factors, x_tile, x_mask, not EVEN_K)
        else:
            acc = _chunk_terms(words, factors, x_tile, x_mask, one_bits, not EVEN_K, ASM)
    else:
        acc = tl.zeros([M_PAD, BLOCK_N, CHUNKS], dtype=tl.float32)
        for c0 in range(0, KC, CHUNKS):
            # The next tile is loaded before this one is used (the last iteration reloads its own: L1 hits).
            c_next = tl.minimum(c0 + CHUNKS, KC - CHUNKS) if EVEN_K else tl.minimum(c0 + CHUNKS, KC - 1)
            words_next, factors_next = _load_tile(w_tile, f_tile, c_next, KC, offs_w, offs_c, GROUP_CHUNKS, EVEN_K)
            x_mask = (c0 * X_PER_CHUNK + offs_x < KC * X_PER_CHUNK)[None, None, :]
            if HALF2:
                acc += _chunk_terms_half2(words, factors, x_tile + c0 * X_CHUNK, x_mask, not EVEN_K)
            else:
                acc += _chunk_terms(words, factors, x_tile + c0 * X_CHUNK, x_mask, one_bits, not EVEN_K, ASM)
            words = words_next
            factors = factors_next
    y = tl.sum(acc, axis=2)  # [M_PAD, BLOCK_N]
    if HAS_BIAS:
        y += tl.load(bias_ptr + w_rows).to(tl.float32)[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


@triton.jit
def _pair_plane(lo, hi, zero, scale16, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """Nibbles ``j`` (``lo``) and ``j + 4`` (``hi``) of each word, ``[BLOCK_N, 4 * CHUNKS]`` of ``1 + q/16``,
    dequantized and interleaved as ``[BLOCK_N, CHUNKS, 8]``: entry ``2s + h`` of a chunk is word ``s``'s
    nibble ``j + 4h``, its input ``8j + 2s + h``."""
    shape: tl.constexpr = [BLOCK_N, CHUNKS, 4]
    both = tl.join(tl.reshape((lo - zero) * scale16, shape), tl.reshape((hi - zero) * scale16, shape))
    return tl.reshape(both, [BLOCK_N, CHUNKS, 8])


@triton.jit
def _int4_dequant_kernel(w_ptr, f_ptr, out_ptr, N, KC, G, one_bits, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
                         GROUP_CHUNKS: tl.constexpr, ASM: tl.constexpr):
    """``W^T [N, K]`` (``nn.Linear``'s layout) in ``out``'s dtype from a ``[BLOCK_N, 4 * CHUNKS]`` tile of
    words, each chunk's 32 inputs stored as one contiguous 64-byte row segment."""
    pid_n = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    offs_w = pid_c * CHUNKS * 4 + tl.arange(0, CHUNKS * 4)
    offs_c = pid_c * CHUNKS + tl.arange(0, CHUNKS)
    w_mask = offs_w < KC * 4
    words = tl.load(w_ptr + rows[:, None] * (KC * 4) + offs_w[None, :], mask=w_mask[None, :], other=0)
    # [CHUNKS, BLOCK_N], transposed: see _int4_gemv_kernel.
    factors = tl.trans(tl.load(f_ptr + (offs_c // GROUP_CHUNKS)[:, None] + rows[None, :] * G,
                               mask=(offs_c < KC)[:, None], other=0))
    scale16 = factors.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    zero = (factors >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    # Each word's factors: a chunk's four words share them.
    scale16 = tl.reshape(tl.broadcast_to(scale16[:, :, None], [BLOCK_N, CHUNKS, 4]), [BLOCK_N, CHUNKS * 4])
    zero = tl.reshape(tl.broadcast_to(zero[:, :, None], [BLOCK_N, CHUNKS, 4]), [BLOCK_N, CHUNKS * 4])
    n0, n1, n2, n3, n4, n5, n6, n7 = _word_plus_one(words, one_bits, ASM)
    # The chunk's inputs put in order (nibble j + 4h of word s is input 8j + 2s + h) at the price of one
    # layout change: on an H200 the layer took 32 us so, against 60-114 us for four 16-byte stores per
    # chunk from the nibble planes as they come (RESULTS.md, fourth session).
    a0 = _pair_plane(n0, n4, zero, scale16, BLOCK_N, CHUNKS)
    a1 = _pair_plane(n1, n5, zero, scale16, BLOCK_N, CHUNKS)
    a2 = _pair_plane(n2, n6, zero, scale16, BLOCK_N, CHUNKS)
    a3 = _pair_plane(n3, n7, zero, scale16, BLOCK_N, CHUNKS)
    # [rows, chunks, 8 (2s + h), 2 (j's low bit), 2 (j's high bit)] -> [rows, chunks, j, 2s + h]
    both = tl.join(tl.join(a0, a1), tl.join(a2, a3))
    values = tl.reshape(tl.permute(both, (0, 1, 4, 3, 2)), [BLOCK_N, CHUNKS * 32])
    offs_k = pid_c * CHUNKS * 32 + tl.arange(0, CHUNKS * 32)
    mask = (offs_n < N)[:, None] & (offs_k < KC * 32)[None, :]
    tl.store(out_ptr + rows[:, None] * (KC * 32) + offs_k[None, :], values.to(out_ptr.dtype.element_ty), mask=mask)


def dequantize_int4(weight: KMajorInt4, out: torch.Tensor, *, block_n: int = 16, chunks: int = 32,
                    num_warps: int = 4) -> torch.Tensor:
    """``W^T [N, K]`` into ``out`` (its dtype, contiguous), one launch: ``(1 + q/16 - (1 + z/16)) * 16 s``
    is exact before the cast. A program dequantizes ``block_n`` rows x ``chunks`` chunks (on an H200 any
    tile from 4 x 32 to 64 x 8 took 32-34 us for 4096 x 11008)."""
    n, k = weight.out_features, weight.in_features
    if tuple(out.shape) != (n, k) or not out.is_contiguous() or out.dtype not in _checks.FLOAT_DTYPES:
        _checks.fail(f"out must be a contiguous float [{n}, {k}] tensor, got {tuple(out.shape)} {out.dtype}")
    _checks.check_same_device(words=weight.words, out=out)
    for name, value in (("block_n", block_n), ("chunks", chunks), ("num_warps", num_warps)):
        _checks.check_power_of_two(name, value)
    kc = k // K_MAJOR_CHUNK
    _int4_dequant_kernel[(triton.cdiv(n, block_n), triton.cdiv(kc, chunks))](
        weight.words, weight.factors, out, n, kc, k // weight.group_size, ONE_BITS,
        BLOCK_N=block_n, CHUNKS=chunks, GROUP_CHUNKS=weight.group_size // K_MAJOR_CHUNK, ASM=_use_asm(None),
        num_warps=num_warps,
    )
    return out


def _check(x: torch.Tensor, weight: KMajorInt4, bias: torch.Tensor | None) -> None:
    _checks.check_float("x", x, 2)
    if x.shape[0] > INT4_GEMV_MAX_M:
        _checks.fail(f"x has {x.shape[0]} rows; the int4 GEMV takes at most {INT4_GEMV_MAX_M}")
    n, k8 = weight.words.shape
    k = k8 * 8
    group = weight.group_size
    if weight.words.dtype != torch.int32 or weight.factors.dtype != torch.int32:
        _checks.fail("K-major words and factors must be int32")
    if x.shape[1] != k or k % K_MAJOR_CHUNK or group % K_MAJOR_CHUNK or k % group:
        _checks.fail(f"x has K={x.shape[1]}, the weight K={k} (a multiple of {K_MAJOR_CHUNK}) in groups of {group}")
    if tuple(weight.factors.shape) != (n, k // group):
        _checks.fail(f"factors {tuple(weight.factors.shape)} must be [{n}, {k // group}]")
    if not (weight.words.is_contiguous() and weight.factors.is_contiguous()):
        _checks.fail("K-major words and factors must be contiguous")
    tensors = {"x": x, "words": weight.words, "factors": weight.factors}
    if bias is not None:
        _checks.check_float("bias", bias, 1)
        if bias.shape[0] != n:
            _checks.fail(f"bias must have {n} elements, got {bias.shape[0]}")
        tensors["bias"] = bias
    _checks.check_same_device(**tensors)


def int4_gemv(
    x: torch.Tensor, weight: KMajorInt4, bias: torch.Tensor | None = None, *, config: Int4GemvConfig | None = None
) -> torch.Tensor:
    """``x [M <= 8, K] @ W [K, N] (+ bias)`` in ``x.dtype`` (fp32 accumulation), ``W`` K-major int4."""
    _check(x, weight, bias)
    config = config or Int4GemvConfig()
    m, k = x.shape
    n = weight.out_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    for name in ("block_n", "num_warps", "chunks_per_thread"):
        if getattr(config, name) is not None:
            _checks.check_power_of_two(name, getattr(config, name))
    kc = k // K_MAJOR_CHUNK
    num_warps = config.num_warps
    chunks = 32 * num_warps * config.chunks_per_thread
    # A short K takes fewer warps, so that a tile still gives every thread its own chunk.
    while num_warps > 1 and chunks // 2 >= kc:
        num_warps //= 2
        chunks //= 2
    pdl = resolve_pdl(x.device, config.pdl)
    math = config.math or default_math(x)
    if math not in ("fp32", "half2"):
        _checks.fail(f"math must be 'fp32' or 'half2', got {math!r}")
    half2 = math == "half2"
    if half2 and (x.dtype != torch.float16 or interpreter_enabled()):
        _checks.fail("math='half2' takes fp16 x, compiled (its PTX does not run in the interpreter)")
    if half2 and (x.stride(0) % 2 or x.data_ptr() % 4):
        # its x loads are int32 pairs: rows must start on a 4-byte boundary
        _checks.fail(f"math='half2' needs x's rows 4-byte aligned, got row stride {x.stride(0)}")
    if half2:  # H200, 4096 -> 11008: 8 rows 12.1 / 21.5 us at M = 2 / 4; at M = 6, 4 rows 47.5, 8 spill (360)
        block_n = config.block_n or (8 if m <= 4 else 4 if m <= 6 else 2)
    else:
        block_n = config.block_n or (8 if m <= 2 else 4 if m <= 4 else 2)
    if config.block_n is None and m > 1 and kc > chunks:
        block_n //= 2  # the loop's next tile doubles the words held: 8 rows of 2 rows of x spilled on sm_90
    _int4_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight.words, weight.factors, bias if bias is not None else x, out,
        m, n, kc, k // weight.group_size, x.stride(0), out.stride(0), ONE_BITS,
        M_PAD=triton.next_power_of_2(m), BLOCK_N=block_n, CHUNKS=chunks,
        GROUP_CHUNKS=weight.group_size // K_MAJOR_CHUNK,
        EVEN_K=kc % chunks == 0, ONE_TILE=kc <= chunks, HAS_BIAS=bias is not None, ASM=_use_asm(config.unpack),
        HALF2=half2,
        num_warps=num_warps, num_stages=1, **pdl_launch(pdl), **({"maxnreg": config.maxnreg} if config.maxnreg else {}),
    )
    return out


def default_math(x: torch.Tensor) -> str:
    """"half2" where it can run (fp16 x, compiled, rows 4-byte aligned), else "fp32"."""
    aligned = x.stride(0) % 2 == 0 and x.data_ptr() % 4 == 0
    return "half2" if x.dtype == torch.float16 and aligned and not interpreter_enabled() else "fp32"


# Rows up to which ``int4_linear`` takes the GEMV, by the math it runs; above, the weight is dequantized
# once and the library matmul runs (~59 us at any M). On an H200 at 4096 -> 11008 (RESULTS.md, fourth
# session) the GEMV took 9.2 / 12.0 / 21.5 / 47.5 / 65.2 us at 1 / 2 / 4 / 6 / 8 rows with half2, and
# 11.0 / 16.6 / 31.9 / 105 / 106 us at 1 / 2 / 4 / 6 / 8 with the fp32 math (bf16 x).
LINEAR_GEMV_MAX_M = {"half2": 6, "fp32": 4}


def takes_gemv(x: torch.Tensor) -> bool:
    """Whether ``int4_linear`` runs ``x [M, K]`` through the GEMV (else dequantize + matmul)."""
    return x.shape[0] <= LINEAR_GEMV_MAX_M[default_math(x)]


def int4_linear(x: torch.Tensor, weight: KMajorInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a K-major int4 weight, any number of rows of ``x [M, K]``: the GEMV for decode
    batches, dequantize-then-matmul for prefill."""
    if takes_gemv(x):
        return int4_gemv(x, weight, bias)
    return int4_dequant_linear(x, weight, bias)


def int4_dequant_linear(x: torch.Tensor, weight: KMajorInt4, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the weight dequantized into a scratch buffer first (one launch), then the
    library matmul: ``int4_linear``'s path for prefill-sized ``x``."""
    n, k = weight.out_features, weight.in_features
    w = scratch_matrix(x.device, f"int4 dequantized weight {x.dtype}", n, k, x.dtype)
    return torch.nn.functional.linear(x, dequantize_int4(weight, w), bias)
