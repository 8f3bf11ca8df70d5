"""Fused dequantize-GEMM for AWQ int4 weights (AutoAWQ "GEMM" layout, see ``awq_reference``).

``y [M, N] = x [M, K] @ W [K, N]`` where ``W`` never exists in memory. Each program loads whole packed
int32 words (eight outputs each, 16-byte vector loads along the word row), shifts the eight nibbles
out in registers, and keeps its outputs in *nibble order*: nibble ``i`` of word ``c`` is output column
``8c + AWQ_ORDER[i]``, so zeros, scales and the final store use that column map and nothing is ever
permuted. Two shapes of launch:

- GEMV (small ``M``, decode), bound by reading the weights: one program per (row, block of words,
  slice of K), one accumulator per nibble position laid out like the words, summed over K once. With
  K split, the slices meet in a shared fp32 workspace and the last one to arrive stores the outputs,
  so a call is one launch; unsplit, a program stores its outputs directly.
- tiled (larger ``M``, prefill): ``BLOCK_M x 8*BLOCK_C`` output tiles, the dequantized ``[BLOCK_K,
  8*BLOCK_C]`` weight tile fed to ``tl.dot``. A K step never straddles a group.
- dequantize then matmul (``M >= DEQUANT_MIN_M``): ``W`` written once in ``x``'s dtype to a scratch
  buffer, rows in AWQ's column order, then the library matmul.

History on an H200 (4096x11008 at M=1; fp16 ``torch.matmul`` 24.8-25.6 us): one word loaded per output
column, each word eight times, 296 us (load-unit bound); whole words into a ``[BLOCK_K, BLOCK_C, 8]``
tensor, 21.9 us (that 3-d layout went through shared memory every step, and the split-K sums needed a
zero-fill and a cast launch around the kernel); per-nibble 2-d accumulators, 16-byte loads, a cp.async
ring and split-K in one launch: 21.5 us at its best tile, the same quarter of copy bandwidth; the same
with the tile's rows folded into one layout tile of accumulators in registers and whole groups loaded
straight to registers by one-warp programs: 16.1 us (1.6x fp16). Fewer instructions per weight
(fp16x2 products) did not move it; the SASS showed why: ~4 of a thread's 32 word loads in flight, and
eight scale loads waited out one after another behind layout-conversion barriers. This version loads
the words first and the scales in one load (all word loads in flight before the first barrier), not
yet timed (RESULTS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import interpreter_enabled, num_sms
from ._workspace import scratch, scratch_matrix

# At or below this many rows the GEMV launch. It runs one program row per row of x, so its time grows
# with M: H200, 4096x11008, 16.5 / 24.4 / 38.8 / 65.1 us at M = 1 / 2 / 4 / 8 against the tiled kernel's
# 55-56; the two cross near 6.5 rows (interpolated: 5-7 rows not timed).
GEMV_MAX_M = 6
ONE_BITS = 0x3F800000  # 1.0f, see _nibble_plus_one
# From this many rows the weight is dequantized once and the matmul left to the library; between
# GEMV_MAX_M and this, the fused tiled kernel. H200, 4096x11008: tiled 57 / 87 / 176 us at M = 16 / 64 /
# 256, dequantize + matmul 67 / 68 / 77 us, so the two cross near 32 rows.
DEQUANT_MIN_M = 32
# How the compiled GEMV and dequantize kernels turn nibbles into floats: "asm" (PTX: two nibbles per
# LOP3; H200, 4096x11008 GEMV: 16.1-16.7 us against "shift"'s 44.1 at the one-warp default, 21.5 against
# 22.2 at the old [8, 128] ring) or "shift" (plain Triton). The interpreter cannot run PTX and always
# takes "shift".
UNPACK = "asm"


@triton.jit
def _nibble_columns(offs_c):
    """``[BLOCK_C, 8]`` output column of each nibble of each word, and ``[8]`` nibble shifts."""
    nib = tl.arange(0, 8)
    # AWQ_ORDER: nibble i holds column (i % 4) * 2 + i // 4 of its block of eight.
    cols = offs_c[:, None] * 8 + ((nib % 4) * 2 + nib // 4)[None, :]
    return cols, nib * 4


@triton.jit
def _nibble_column(offs_c, J: tl.constexpr):
    """Output column of nibble ``J`` of words ``offs_c`` (AWQ_ORDER: column (J % 4) * 2 + J // 4 of the
    word's eight)."""
    return offs_c * 8 + (J % 4) * 2 + J // 4


@triton.jit
def _nibbles_to_float(words, shifts):
    """The nibbles of ``words`` as exact fp32 values 0..15, without int-to-float conversions.

    ``0x4B000000 | q`` is the bit pattern of the float ``2**23 + q``; one subtraction leaves ``q``.
    Int-to-float conversions issue at a fraction of the FMA rate, one per weight; this is a logic op
    and an add. Its effect was only measured together with deeper K splits (benchmarks/RESULTS.md).
    """
    bits = ((words >> shifts) & 0xF) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _nibble_plus_one(words, J: tl.constexpr, one_bits):
    """``1 + q/16`` as fp32, for nibble ``J`` (bits ``4J..4J+3``) of each word; ``one_bits`` is 1.0f's bits.

    The nibble is moved to the top of a float's mantissa (bits 19-22) and 1.0's exponent is or-ed in:
    no int-to-float conversion, no subtraction. Costs per nibble, as ptxas schedules them on sm_90: one
    left shift (``IMAD.SHL``, on the FMA pipe, which has room) and one ``LOP3`` (and-or), plus one
    ``SHF`` per word for the upper four nibbles, which only need left shifts once the word is shifted
    down by 16. ``one_bits`` arrives as a kernel argument because ptxas fuses ``(a & imm) | reg`` into
    one LOP3 but splits ``(a & imm) | imm`` into two. The ``1 +`` is taken out per group with the sum of
    ``x`` (``_fold_nibble``); keeping ``q`` in the mantissa's top bits keeps that exact enough: the sums
    lose about two bits, not the twenty a ``2**23 + q`` pattern would.
    """
    if J >= 4:
        words = words >> 16  # arithmetic: the sign bits land outside the mask
    return (((words << (19 - 4 * (J % 4))) & 0x00780000) | one_bits).to(tl.float32, bitcast=True)


def nibble_pairs_ptx(word: str) -> str:
    """PTX (sm_90) leaving in registers ``t0..t3`` (``.b32``, to be declared by the caller) the eight
    nibbles of the 32-bit operand ``word`` as four fp16 pairs ``(1 + q_j/16, 1 + q_j+4/16)``, j < 4. Four
    shifts put nibbles j and j + 4 at bits 6-9 and 22-25, one LOP3 each masks them and ors in two fp16
    1.0s: one logic op per two nibbles."""
    shifts = ("shl.b32 t0, {w}, 6;", "shl.b32 t1, {w}, 2;", "shr.u32 t2, {w}, 2;", "shr.u32 t3, {w}, 6;")
    masks = (f"lop3.b32 t{j}, t{j}, 0x03C003C0, 0x3C003C00, 0xEA;" for j in range(4))
    return "\n".join([*(line.format(w=word) for line in shifts), *masks]) + "\n"


# PTX for all eight ``1 + q/16`` of a word at once (sm_90; see ``_word_plus_one``): the nibble pairs, then
# eight conversions widen them to fp32.
_UNPACK_PTX = tl.constexpr(
    "{\n.reg .b32 t<4>;\n.reg .b16 h<8>;\n" + nibble_pairs_ptx("$8")
    + "".join(f"mov.b32 {{h{j}, h{j + 4}}}, t{j};\n" for j in range(4))
    + "".join(f"cvt.f32.f16 ${i}, h{i};\n" for i in range(8)) + "}\n"
)


@triton.jit
def _word_plus_one(words, one_bits, ASM: tl.constexpr):
    """The eight ``1 + q/16`` of each word, in nibble order.

    ``ASM`` (compiled CUDA only; the interpreter cannot run PTX): two nibbles per LOP3 through fp16, one
    logic op per two nibbles instead of per nibble, plus the fp16-to-fp32 conversions, which issue on
    the FMA pipe; the plain version's shifts and LOP3s all compete for the ALU pipe.
    """
    if ASM:
        return tl.inline_asm_elementwise(
            _UNPACK_PTX, "=r,=r,=r,=r,=r,=r,=r,=r,r", [words],
            dtype=(tl.float32,) * 8, is_pure=True, pack=1,
        )
    else:
        return (
            _nibble_plus_one(words, 0, one_bits), _nibble_plus_one(words, 1, one_bits),
            _nibble_plus_one(words, 2, one_bits), _nibble_plus_one(words, 3, one_bits),
            _nibble_plus_one(words, 4, one_bits), _nibble_plus_one(words, 5, one_bits),
            _nibble_plus_one(words, 6, one_bits), _nibble_plus_one(words, 7, one_bits),
        )


@triton.jit
def _fold_rows(t, ACC_K: tl.constexpr):
    """``[BLOCK_K, C]`` -> ``[ACC_K, C]``: row ``r`` added into row ``r % ACC_K``.

    With ``ACC_K`` the rows one layout tile of the loaded words covers (every warp, every thread once),
    rows ``r`` and ``r + ACC_K`` sit in the same thread, so the sum is in registers: a thread's
    accumulators stay one layout tile whatever ``BLOCK_K`` is, and ``BLOCK_K`` sets only how many
    16-byte loads each thread has in flight.
    """
    if t.shape[0] == ACC_K:
        return t
    return tl.sum(tl.reshape(t, [t.shape[0] // ACC_K, ACC_K, t.shape[1]]), axis=0)


@triton.jit
def _accumulate(a0, a1, a2, a3, a4, a5, a6, a7, x, words, one_bits, ASM: tl.constexpr, ACC_K: tl.constexpr):
    """One ``[BLOCK_K, BLOCK_C]`` tile of words into the eight ``[ACC_K, BLOCK_C]`` per-nibble accumulators."""
    n0, n1, n2, n3, n4, n5, n6, n7 = _word_plus_one(words, one_bits, ASM)
    return (a0 + _fold_rows(x * n0, ACC_K), a1 + _fold_rows(x * n1, ACC_K), a2 + _fold_rows(x * n2, ACC_K),
            a3 + _fold_rows(x * n3, ACC_K), a4 + _fold_rows(x * n4, ACC_K), a5 + _fold_rows(x * n5, ACC_K),
            a6 + _fold_rows(x * n6, ACC_K), a7 + _fold_rows(x * n7, ACC_K))


@triton.jit
def _group_products(x_row, qw_ptr, qz_ptr, s_ptr, g0, N, n8, offs_c, c_mask, one_bits, GROUP: tl.constexpr,
                    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, ACC_K: tl.constexpr, NUM_STAGES: tl.constexpr,
                    ASM: tl.constexpr):
    """One group's ``sum x * (1 + q/16)`` for each nibble position, per accumulator row, the group's
    ``sum x`` (for the zero-point term), and its zero points and scales (``_group_params``).

    Eight ``[ACC_K, BLOCK_C]`` accumulators laid out like one pass of the loaded words: the loop never
    moves data between threads. With ``NUM_STAGES`` > 1 the word loads go through a cp.async ring
    (Triton's pipeliner); with 1 they go straight to registers, ``BLOCK_K / ACC_K`` 16-byte loads per
    thread. ``sum x`` is one reduction per group, after the loop: folding x's rows inside it moved them
    between threads on every step.

    Program order decides what waits for what: x's and the scales' moves into the accumulators'
    layout each pass a barrier, which no later load can be hoisted over, and which waits for its own
    load. So with one tile per group (``BLOCK_K == GROUP``, the default) the words are loaded first,
    and their latency covers those of the scales and of x (the sm_90 SASS then issues most of the
    word loads before the first barrier).
    """
    a0 = tl.zeros((ACC_K, BLOCK_C), dtype=tl.float32)
    a1 = tl.zeros((ACC_K, BLOCK_C), dtype=tl.float32)
    a2 = tl.zeros((ACC_K, BLOCK_C), dtype=tl.float32)
    a3 = tl.zeros((ACC_K, BLOCK_C), dtype=tl.float32)
    a4 = tl.zeros((ACC_K, BLOCK_C), dtype=tl.float32)
    a5 = tl.zeros((ACC_K, BLOCK_C), dtype=tl.float32)
    a6 = tl.zeros((ACC_K, BLOCK_C), dtype=tl.float32)
    a7 = tl.zeros((ACC_K, BLOCK_C), dtype=tl.float32)
    if BLOCK_K == GROUP:
        offs_k = g0 + tl.arange(0, GROUP)
        words = tl.load(qw_ptr + offs_k[:, None] * n8 + offs_c[None, :], mask=c_mask[None, :], other=0)
        zw, s0, s1, s2, s3, s4, s5, s6, s7 = _group_params(qz_ptr, s_ptr, g0 // GROUP, N, n8, offs_c, c_mask)
        x_sum = tl.load(x_row + offs_k).to(tl.float32)
        a0, a1, a2, a3, a4, a5, a6, a7 = _accumulate(a0, a1, a2, a3, a4, a5, a6, a7, x_sum[:, None], words, one_bits,
                                                     ASM, ACC_K)
    else:
        zw, s0, s1, s2, s3, s4, s5, s6, s7 = _group_params(qz_ptr, s_ptr, g0 // GROUP, N, n8, offs_c, c_mask)
        # x's tiles summed elementwise (in registers: the tiles share a layout), reduced once after the loop;
        # GROUP need not be a power of two (a group of 384, or a whole row of K with group size -1).
        x_sum = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in tl.range(g0, g0 + GROUP, BLOCK_K, num_stages=NUM_STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            words = tl.load(qw_ptr + offs_k[:, None] * n8 + offs_c[None, :], mask=c_mask[None, :], other=0)
            x = tl.load(x_row + offs_k).to(tl.float32)
            x_sum += x
            a0, a1, a2, a3, a4, a5, a6, a7 = _accumulate(a0, a1, a2, a3, a4, a5, a6, a7, x[:, None], words, one_bits,
                                                         ASM, ACC_K)
    xs = tl.sum(x_sum)
    return a0, a1, a2, a3, a4, a5, a6, a7, xs, zw, s0, s1, s2, s3, s4, s5, s6, s7


@triton.jit
def _group_params(qz_ptr, s_ptr, g, N, n8, offs_c, c_mask):
    """Group ``g``'s zero-point words and the eight nibbles' scales, ``[BLOCK_C]`` each, times 16 (the
    unpacked nibbles are ``1 + q/16``).

    The scales come in one ``[BLOCK_C, 8]`` load (a word's eight columns are 16 contiguous bytes) and
    are split into nibbles in registers, so that moving them into the accumulators' layout is one
    trip through shared memory. Loaded nibble by nibble, each of the eight took its own trip behind a
    barrier that waited out its load: eight load latencies in a row per program (sm_90 SASS).
    """
    zw = tl.load(qz_ptr + g * n8 + offs_c, mask=c_mask, other=0)
    cols = offs_c[:, None] * 8 + tl.arange(0, 8)[None, :]
    tile = tl.load(s_ptr + g * N + cols, mask=c_mask[:, None], other=0.0).to(tl.float32) * 16.0
    # Column 8c + t holds nibble j = t // 2 + 4 * (t % 2) (AWQ_ORDER), t = 2a + b for j = a + 4b.
    by_a, by_a_hi = tl.split(tl.reshape(tile, [tile.shape[0], 4, 2]))  # b = 0: nibbles 0-3; b = 1: 4-7
    even, odd = tl.split(tl.reshape(by_a, [tile.shape[0], 2, 2]))  # a = 2 * a1 + a0; a0 = 0 / 1
    s0, s2 = tl.split(even)
    s1, s3 = tl.split(odd)
    even, odd = tl.split(tl.reshape(by_a_hi, [tile.shape[0], 2, 2]))
    s4, s6 = tl.split(even)
    s5, s7 = tl.split(odd)
    return zw, s0, s1, s2, s3, s4, s5, s6, s7


@triton.jit
def _fold_nibble(y, a, xs, zero_words, scale, one_bits, J: tl.constexpr):
    """``y += 16 * scale * (sum_rows(a) - xs * (1 + z/16))``: since ``a = sum x * (1 + q/16)`` and ``xs
    = sum x`` over the group, that adds ``scale * sum x * (q - z)`` for nibble ``J`` to the ``[BLOCK_C]``
    running outputs."""
    return y + (tl.sum(a, axis=0) - xs * _nibble_plus_one(zero_words, J, one_bits)) * scale


@triton.jit
def _fold_group(y0, y1, y2, y3, y4, y5, y6, y7, a0, a1, a2, a3, a4, a5, a6, a7, xs,
                zw, s0, s1, s2, s3, s4, s5, s6, s7, one_bits):
    """A group's products into the running outputs, with its zero points and scales (``_group_params``)."""
    return (
        _fold_nibble(y0, a0, xs, zw, s0, one_bits, 0),
        _fold_nibble(y1, a1, xs, zw, s1, one_bits, 1),
        _fold_nibble(y2, a2, xs, zw, s2, one_bits, 2),
        _fold_nibble(y3, a3, xs, zw, s3, one_bits, 3),
        _fold_nibble(y4, a4, xs, zw, s4, one_bits, 4),
        _fold_nibble(y5, a5, xs, zw, s5, one_bits, 5),
        _fold_nibble(y6, a6, xs, zw, s6, one_bits, 6),
        _fold_nibble(y7, a7, xs, zw, s7, one_bits, 7),
    )


@triton.jit
def _store_nibble_outputs(y, out_row, bias_ptr, offs_c, c_mask, J: tl.constexpr, HAS_BIAS: tl.constexpr):
    col = _nibble_column(offs_c, J)
    total = y
    if HAS_BIAS:
        total += tl.load(bias_ptr + col, mask=c_mask, other=0.0).to(tl.float32)
    tl.store(out_row + col, total.to(out_row.dtype.element_ty), mask=c_mask)


@triton.jit
def _add_nibble_outputs(y, sum_row, offs_c, c_mask, J: tl.constexpr):
    tl.atomic_add(sum_row + _nibble_column(offs_c, J), y, mask=c_mask, sem="relaxed")


@triton.jit
def _awq_gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr, sum_ptr, count_ptr,
    N, n8, K, stride_xm, one_bits,
    GROUP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, ACC_K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SPLITS: tl.constexpr, HAS_BIAS: tl.constexpr, NUM_STAGES: tl.constexpr, ASM: tl.constexpr,
):
    """One program: one row of ``x``, ``BLOCK_C`` words (8 * BLOCK_C outputs), one slice of K.

    The eight nibbles of a word go to eight accumulators laid out like the loaded words
    (``_group_products``; the previous version's 3-d ``[BLOCK_K, BLOCK_C, 8]`` tensor went through
    shared memory on every step), summed across threads once per group, before its scales. With K split, the
    slices add into the fp32 ``sum`` workspace and the last slice to arrive (an atomic counter per
    output block) stores the row in ``out``'s dtype and leaves ``sum`` and the counter at zero for
    the next launch: one launch, no zero-fill or cast kernels around it.
    """
    pid_c = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < n8
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    k_start = pid_k * K_PER_SPLIT
    a0, a1, a2, a3, a4, a5, a6, a7, xs, zw, s0, s1, s2, s3, s4, s5, s6, s7 = _group_products(
        x_row, qw_ptr, qz_ptr, s_ptr, k_start, N, n8, offs_c, c_mask, one_bits, GROUP, BLOCK_K, BLOCK_C, ACC_K,
        NUM_STAGES, ASM)
    y0, y1, y2, y3, y4, y5, y6, y7 = _fold_group(
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, a0, a1, a2, a3, a4, a5, a6, a7, xs,
        zw, s0, s1, s2, s3, s4, s5, s6, s7, one_bits)
    if K_PER_SPLIT > GROUP:
        # The slice's other groups. A compile-time branch: with one group per slice (what the launcher
        # picks for big layers) the running ``y`` tiles are not held through a loop's registers. A ring
        # over whole groups instead (the loop below pipelined, each group's tiles unrolled) ran 17.7-25.5
        # us on an H200 at 4096x11008, against 16.1 for one group per slice (RESULTS.md).
        k_end = tl.minimum(k_start + K_PER_SPLIT, K)  # K_PER_SPLIT and K are whole groups
        for g0 in range(k_start + GROUP, k_end, GROUP):
            a0, a1, a2, a3, a4, a5, a6, a7, xs, zw, s0, s1, s2, s3, s4, s5, s6, s7 = _group_products(
                x_row, qw_ptr, qz_ptr, s_ptr, g0, N, n8, offs_c, c_mask, one_bits, GROUP, BLOCK_K, BLOCK_C, ACC_K,
                NUM_STAGES, ASM)
            y0, y1, y2, y3, y4, y5, y6, y7 = _fold_group(
                y0, y1, y2, y3, y4, y5, y6, y7, a0, a1, a2, a3, a4, a5, a6, a7, xs,
                zw, s0, s1, s2, s3, s4, s5, s6, s7, one_bits)
    out_row = out_ptr + row.to(tl.int64) * N
    if SPLITS == 1:
        _store_nibble_outputs(y0, out_row, bias_ptr, offs_c, c_mask, 0, HAS_BIAS)
        _store_nibble_outputs(y1, out_row, bias_ptr, offs_c, c_mask, 1, HAS_BIAS)
        _store_nibble_outputs(y2, out_row, bias_ptr, offs_c, c_mask, 2, HAS_BIAS)
        _store_nibble_outputs(y3, out_row, bias_ptr, offs_c, c_mask, 3, HAS_BIAS)
        _store_nibble_outputs(y4, out_row, bias_ptr, offs_c, c_mask, 4, HAS_BIAS)
        _store_nibble_outputs(y5, out_row, bias_ptr, offs_c, c_mask, 5, HAS_BIAS)
        _store_nibble_outputs(y6, out_row, bias_ptr, offs_c, c_mask, 6, HAS_BIAS)
        _store_nibble_outputs(y7, out_row, bias_ptr, offs_c, c_mask, 7, HAS_BIAS)
    else:
        sum_row = sum_ptr + row.to(tl.int64) * N
        _add_nibble_outputs(y0, sum_row, offs_c, c_mask, 0)
        _add_nibble_outputs(y1, sum_row, offs_c, c_mask, 1)
        _add_nibble_outputs(y2, sum_row, offs_c, c_mask, 2)
        _add_nibble_outputs(y3, sum_row, offs_c, c_mask, 3)
        _add_nibble_outputs(y4, sum_row, offs_c, c_mask, 4)
        _add_nibble_outputs(y5, sum_row, offs_c, c_mask, 5)
        _add_nibble_outputs(y6, sum_row, offs_c, c_mask, 6)
        _add_nibble_outputs(y7, sum_row, offs_c, c_mask, 7)
        # Every thread's adds come before the counter's release (the pattern of CUTLASS's semaphore:
        # a CTA barrier, then one release atomic); the last arriver's acquire then sees all slices.
        tl.debug_barrier()
        counter = count_ptr + row * tl.num_programs(0) + pid_c
        if tl.atomic_add(counter, 1, sem="acq_rel") == SPLITS - 1:
            offs_n = pid_c * BLOCK_C * 8 + tl.arange(0, BLOCK_C * 8)
            n_mask = offs_n < N
            total = tl.load(sum_row + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
            tl.store(out_row + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_mask)
            tl.store(sum_row + offs_n, tl.zeros((BLOCK_C * 8,), dtype=tl.float32), mask=n_mask)
            tl.atomic_xchg(counter, 0, sem="relaxed")


@triton.jit
def _awq_dequant_kernel(
    qw_ptr, qz_ptr, s_ptr, w_ptr, N, n8, one_bits,
    GROUP: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, ASM: tl.constexpr,
):
    """``W [K, N]`` in ``w``'s dtype from a ``[BLOCK_K, BLOCK_C]`` tile of words: the nibbles unpacked as
    in the GEMV, then interleaved into AWQ's column order so that the stores are whole rows."""
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)  # K % BLOCK_K == 0 and BLOCK_K divides GROUP
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < n8
    words = tl.load(qw_ptr + offs_k[:, None] * n8 + offs_c[None, :], mask=c_mask[None, :], other=0)
    g = pid_k * BLOCK_K // GROUP
    zw, s0, s1, s2, s3, s4, s5, s6, s7 = _group_params(qz_ptr, s_ptr, g, N, n8, offs_c, c_mask)
    n0, n1, n2, n3, n4, n5, n6, n7 = _word_plus_one(words, one_bits, ASM)
    w0 = _dequant_nibble(n0, zw, s0, one_bits, 0)
    w1 = _dequant_nibble(n1, zw, s1, one_bits, 1)
    w2 = _dequant_nibble(n2, zw, s2, one_bits, 2)
    w3 = _dequant_nibble(n3, zw, s3, one_bits, 3)
    w4 = _dequant_nibble(n4, zw, s4, one_bits, 4)
    w5 = _dequant_nibble(n5, zw, s5, one_bits, 5)
    w6 = _dequant_nibble(n6, zw, s6, one_bits, 6)
    w7 = _dequant_nibble(n7, zw, s7, one_bits, 7)
    # Nibble j = a + 4b of word c is column 8c + 2a + b (AWQ_ORDER): interleaving the a bits, then b,
    # puts every value at its column, [BLOCK_K, 8 * BLOCK_C].
    rows = tl.interleave(
        tl.interleave(tl.interleave(w0, w2), tl.interleave(w1, w3)),
        tl.interleave(tl.interleave(w4, w6), tl.interleave(w5, w7)),
    )
    offs_n = pid_c * BLOCK_C * 8 + tl.arange(0, BLOCK_C * 8)
    tl.store(w_ptr + offs_k[:, None] * N + offs_n[None, :], rows.to(w_ptr.dtype.element_ty),
             mask=(offs_n < N)[None, :])


@triton.jit
def _dequant_nibble(n, zero_words, scale, one_bits, J: tl.constexpr):
    """``(q - z) * scale`` for nibble ``J``, from its ``1 + q/16`` (``(1 + q/16) - (1 + z/16)`` is exact;
    ``scale`` comes times 16 from ``_group_params``)."""
    return (n - _nibble_plus_one(zero_words, J, one_bits)[None, :]) * scale[None, :]


@triton.jit
def _awq_gemm_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    BLOCK_N: tl.constexpr = BLOCK_C * 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < M
    c_mask = offs_c < N // 8
    n8 = N // 8
    cols, shifts = _nibble_columns(offs_c)
    cols = tl.reshape(cols, [BLOCK_N])
    n_mask = tl.reshape(tl.broadcast_to(c_mask[:, None], (BLOCK_C, 8)), [BLOCK_N])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K % BLOCK_K == 0: no K mask
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        words = tl.load(qw_ptr + offs_k[:, None] * n8 + offs_c[None, :], mask=c_mask[None, :], other=0)
        q = tl.reshape(_nibbles_to_float(words[:, :, None], shifts[None, None, :]), [BLOCK_K, BLOCK_N])
        g = k0 // GROUP
        zw = tl.load(qz_ptr + g * n8 + offs_c, mask=c_mask, other=0)
        zeros = tl.reshape(_nibbles_to_float(zw[:, None], shifts[None, :]), [BLOCK_N])
        scales = tl.load(s_ptr + g * N + cols, mask=n_mask, other=0.0).to(tl.float32)
        w = ((q - zeros[None, :]) * scales[None, :]).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _use_asm(unpack: str | None) -> bool:
    """Whether the nibbles go through the PTX unpack: ``unpack`` ("asm" / "shift"), or None for the
    default, ``UNPACK`` when compiled and "shift" in the interpreter (which cannot run PTX)."""
    unpack = unpack or ("shift" if interpreter_enabled() else UNPACK)
    if unpack not in ("asm", "shift") or (unpack == "asm" and interpreter_enabled()):
        raise ValueError(f"unpack {unpack!r}: 'shift', or 'asm' when compiled (the interpreter cannot run PTX)")
    return unpack == "asm"


def _block_k(group_size: int, largest: int = 64) -> int:
    """Largest power of two <= ``largest`` dividing the group size (tl.dot needs >= 16)."""
    block = largest
    while block > 16 and group_size % block:
        block //= 2
    if group_size % block:
        raise ValueError(f"AWQ group size {group_size} must be a multiple of 16 for the Triton kernel")
    return block


def _layout_rows(block_k: int, block_c: int, num_warps: int) -> int:
    """Rows of a ``[block_k, block_c]`` word tile that one pass of the CTA's threads covers with 16-byte
    loads (four words per thread along a row, the rest of a warp on the next rows, warps stacked along
    K): the accumulator rows ``_fold_rows`` keeps, the rest of the tile being summed in registers."""
    threads_per_row = min(32, block_c // 4)
    return min(block_k, 32 // threads_per_row * num_warps)


def _check(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int):
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.stride(-1) != 1:
        raise ValueError(f"x must be a 2-d fp16/bf16/fp32 tensor, contiguous in K; got {x.dtype} {tuple(x.shape)}")
    k, n8 = qweight.shape
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError("qweight and qzeros must be int32")
    if x.shape[1] != k or k % group:
        raise ValueError(f"x has K={x.shape[1]}, qweight {tuple(qweight.shape)}, group size {group}")
    if tuple(qzeros.shape) != (k // group, n8) or tuple(scales.shape) != (k // group, n8 * 8):
        raise ValueError(
            f"qzeros {tuple(qzeros.shape)} / scales {tuple(scales.shape)} do not match qweight "
            f"{tuple(qweight.shape)} with group size {group}"
        )
    devices = {t.device for t in (x, qweight, qzeros, scales)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if not (qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous()):
        raise ValueError("qweight, qzeros and scales must be contiguous")


def awq_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    force: str | None = None,  # "gemv", "tiled" or "dequant": pick the launch (tests); default by M
    gemv_config: dict[str, int | str] | None = None,  # keyword arguments of _gemv
    tiled_config: dict[str, int] | None = None,  # block_m / block_c / block_k / num_warps / num_stages
) -> torch.Tensor:
    """``x [M, K] @ dequant(W) [K, N] (+ bias)`` in ``x.dtype``, accumulating in fp32."""
    _check(x, qweight, qzeros, scales, group_size)
    launch = force or launch_for(x.shape[0])
    if launch == "gemv":
        return _gemv(x, qweight, qzeros, scales, group_size, bias, **(gemv_config or {}))
    if launch == "dequant":
        return _dequant_matmul(x, qweight, qzeros, scales, group_size, bias)
    return _tiled(x, qweight, qzeros, scales, group_size, bias, **(tiled_config or {}))


def launch_for(m: int) -> str:
    """The launch ``awq_gemm`` picks for ``m`` rows: "gemv", "tiled" or "dequant"."""
    if m <= GEMV_MAX_M:
        return "gemv"
    return "dequant" if m >= DEQUANT_MIN_M else "tiled"


def awq_dequantize(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int, out: torch.Tensor
) -> torch.Tensor:
    """``dequant(W) [K, N]`` into ``out`` (its dtype), one launch."""
    k, n8 = qweight.shape
    n = n8 * 8
    if out.shape != (k, n) or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous [{k}, {n}] tensor, got {tuple(out.shape)}")
    block_k, block_c = _block_k(group_size, 16), 32
    _awq_dequant_kernel[(k // block_k, triton.cdiv(n8, block_c))](
        qweight, qzeros, scales, out, n, n8, ONE_BITS,
        GROUP=group_size, BLOCK_K=block_k, BLOCK_C=block_c, ASM=_use_asm(None), num_warps=4,
    )
    return out


def _dequant_matmul(
    x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """Large M: the weight dequantized once into a scratch buffer (read 4 bits, write 16 per weight),
    then the library matmul, which beats a fused kernel that re-dequantizes per row block."""
    k, n = qweight.shape[0], scales.shape[1]
    w = scratch_matrix(x.device, f"awq dequantized weight {x.dtype}", k, n, x.dtype)
    awq_dequantize(qweight, qzeros, scales, group_size, w)
    out = torch.matmul(x, w)
    return out if bias is None else out + bias


def _gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    block_c: int = 32,
    block_k: int | None = None,
    splits: int | None = None,
    num_warps: int = 1,
    num_stages: int = 1,
    unpack: str | None = None,
    acc_k: int | None = None,
    maxnreg: int | None = None,
) -> torch.Tensor:
    """Defaults from the H200 sweeps at M=1 on 4096x11008 (``quant.py --gemv-configs``, RESULTS.md): one
    warp per program, a ``[128, 32]`` word tile (a whole group of 128; ``block_k`` defaults to the
    largest power of two up to 128 dividing the group) loaded straight to registers (``num_stages`` 1),
    its rows folded into 4 accumulator rows per nibble (``acc_k``), one group per K slice: 16.1-16.7 us.
    The ring of ``[8, 128]`` tiles at 4 warps that was the default before took 21.3; every config sat
    near ten warps per SM (Nsight Compute: 16% occupancy, 0.67 waves) with most cycles issuing nothing.
    Those times are from before ``_group_products`` loaded the words ahead of the scales and x (not
    yet timed). ``maxnreg`` caps ptxas's registers."""
    m, k = x.shape
    n = scales.shape[1]
    block_k = block_k or _block_k(group_size, 128)
    if group_size % block_k:
        raise ValueError(f"block_k {block_k} must divide the group size {group_size}")
    asm = _use_asm(unpack)
    if block_k * block_c < 4 * 32 * num_warps:
        # Smaller tiles would leave threads holding copies of each other's words (the same work twice).
        raise ValueError(f"a {block_k}x{block_c} word tile is too small for {num_warps} warps of 16-byte loads")
    if acc_k is None:
        acc_k = _layout_rows(block_k, block_c, num_warps)
    if block_k % acc_k:
        raise ValueError(f"acc_k {acc_k} must divide block_k {block_k}")
    groups = k // group_size
    blocks = triton.cdiv(n // 8, block_c)
    if splits is None:
        # Split K (down to one group per slice) until about 32 warps per SM are in flight (the v3 kernel
        # on an H200 went 35.6 -> 23.3 us from 4 to 32 slices on 4096x11008).
        splits = triton.cdiv(8 * num_sms(x.device) * 4, blocks * m * num_warps)
    k_per_split = triton.cdiv(groups, max(1, min(splits, groups))) * group_size
    splits = triton.cdiv(k, k_per_split)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if splits > 1:  # zero between launches: the last slice of each block puts them back
        sums = scratch(x.device, "awq sums", m * n, torch.float32)
        counts = scratch(x.device, "split-K arrival counters", m * blocks, torch.int32)
    else:
        sums = counts = out  # unused
    _awq_gemv_kernel[(blocks, m, splits)](
        # N // 8 passed on its own: Triton sees it divisible by 4 (N by 32) and loads 16-byte vectors.
        x, qweight, qzeros, scales, bias if bias is not None else scales, out, sums, counts, n, n // 8, k, x.stride(0),
        ONE_BITS,
        GROUP=group_size, BLOCK_C=block_c, BLOCK_K=block_k, ACC_K=acc_k, K_PER_SPLIT=k_per_split, SPLITS=splits,
        HAS_BIAS=bias is not None, NUM_STAGES=num_stages, ASM=asm, num_warps=num_warps,
        # a register cap for ptxas: fewer loads in flight per thread, more programs per SM
        **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    return out


def _tiled(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    block_m: int | None = None,
    block_c: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    m, k = x.shape
    n = scales.shape[1]
    block_k = block_k or _block_k(group_size)
    if group_size % block_k or block_k < 16:
        raise ValueError(f"block_k {block_k} must be >= 16 and divide the group size {group_size}")
    block_m = block_m or (16 if m <= 16 else (32 if m <= 32 else 64))
    block_c = block_c or (8 if n <= 2048 or m <= 32 else 16)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n // 8, block_c))
    _awq_gemm_kernel[grid](
        x, qweight, qzeros, scales, bias if bias is not None else scales, out,
        m, n, k, x.stride(0), out.stride(0),
        GROUP=group_size, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return out
