"""Triton GEMV for decode-sized linears: ``y [M, N] = x [M, K] @ W [N, K]^T (+ bias)``, ``M <= 8``.

At decode sizes a linear layer is a stream of its weight: every weight is read once and used ``M``
times. cuBLAS's small-M kernels reach 30-80% of copy bandwidth on a 1.1B model's projections
(benchmarks/RESULTS.md); this kernel is built to stream ``W`` (``nn.Linear`` layout, K contiguous):

- each program owns ``BLOCK_N`` rows of ``W`` and one slice of K, walked in ``[BLOCK_N, BLOCK_K]``
  tiles. ``BLOCK_K`` spans every lane of every warp with one 16-byte vector (``VEC`` elements) each,
  so each thread issues ``BLOCK_N`` whole-vector loads per tile, and the layout is the same whatever
  order Triton's coalescing picks for dims it cannot rank (3.6 and 3.9 break those ties differently).
  The vectors need row strides Triton can prove 16-byte aligned (K a multiple of 16, as in every model
  we serve); other K still work, with narrower loads;
- products are summed over each thread's ``VEC`` elements in registers into an fp32 accumulator
  ``[M, BLOCK_N, BLOCK_K // VEC]``: no cross-thread reduction in the loop, one at the end;
- the next tile is loaded before the current one is used;
- rows past N and padding rows of x are clamped, not masked, and a ragged end of K is read as the whole
  tile that ends at K (its already-counted part dropped from the sum), so no load is predicated;
- K is split when N alone gives too few programs to keep every SM streaming. The slices meet in one
  launch: each writes fp32 partials to a cached workspace, then bumps an arrival counter per block of
  outputs; the last to arrive sums all partials in slice order (the result does not depend on who
  came last), adds the bias, stores ``y`` in x's dtype and resets the counter to 0 for the next call
  (so a CUDA graph replays it as is);
- with PDL (``_pdl.py``) a program loads its first weight tile, then waits for the previous kernel,
  then reads x: the weights stream while the previous kernel drains.
"""

from __future__ import annotations

import dataclasses
import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _checks
from ._device import num_sms, pdl_enabled, resolve_pdl
from ._pdl import pdl_launch, pdl_launch_dependents, pdl_wait
from ._workspace import scratch
from .fused_layers import rms_norm, silu_and_mul

GEMV_MAX_M = 8  # rows of x this kernel takes (decode batches); above it the matmul is compute-shaped
# Rows up to which ``linear`` prefers this kernel to cuBLAS, with PDL only. On an H200 (1.1B projections,
# benchmarks/RESULTS.md) it won at 1 row with PDL (qkv 5.3 vs 6.4 us, o 5.0 vs 6.3, gate_up and down
# level), lost from 2 rows on the big projections and at every size without PDL.
LINEAR_MAX_ROWS = 1
VECTOR_BYTES = 16  # one ld.global.v4 per thread and chunk
# Programs per SM the K split aims for: enough bytes in flight per SM to cover memory latency.
PROGRAMS_PER_SM = 4


@dataclasses.dataclass(frozen=True)
class GemvConfig:
    """Launch parameters; ``None`` picks the default for the shape (benchmarks sweep them)."""

    block_n: int | None = None  # rows of W per program
    block_k: int | None = None  # K elements per tile (a power of two; default one vector per lane)
    splits: int | None = None  # K slices (1 = unsplit: no workspace)
    num_warps: int = 4
    pdl: bool | None = None  # programmatic dependent launch: None as _device.pdl_enabled, True where supported
    # A resident grid of ``programs_per_sm`` programs per SM, each streaming several row blocks
    # (``_gemv_persistent_kernel``; splits is then ignored). Off: on an H200 it won on o_proj and down_proj
    # (4.5 vs 5.0, 9.6 vs 10.5 us), lost on qkv and gate_up (6.7 vs 5.3, 18.7 vs 13.6) and made the 1.1B
    # decode step slower (1.099 vs 1.058 ms, RESULTS.md).
    persistent: bool = False
    programs_per_sm: int = 2


# The launch of the model's GEMVs (``linear`` and the decode fusions), which only take the GEMV with PDL
# (so it is known on and not asked again). Benchmarks swap it to time another launch in the model.
MODEL_LAUNCH = GemvConfig(pdl=True)


@triton.jit
def _tile_sum(w, x_ptrs, keep, HAS_KEEP: tl.constexpr, M_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
              CHUNKS: tl.constexpr, VEC: tl.constexpr):
    """``[M, BLOCK_N, CHUNKS]``: products of a weight tile ``[1, BLOCK_N, BLOCK_K]`` with x
    ``[M, BLOCK_N, BLOCK_K]`` (broadcast over N), summed over each thread's ``VEC`` elements; with
    HAS_KEEP only the K positions where ``keep`` holds count."""
    x = tl.load(x_ptrs).to(tl.float32)
    products = w.to(tl.float32) * x
    if HAS_KEEP:
        products = tl.where(keep, products, 0.0)
    return tl.sum(tl.reshape(products, [M_PAD, BLOCK_N, CHUNKS, VEC]), axis=3)


@triton.jit
def _epilogue(y, up, bias_ptr, res_ptr, w_rows, offs_m, offs_n, N_UP, stride_rm, out_mask,
              out_ty: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr, GATED: tl.constexpr):
    """The finished fp32 sums ``[M, BLOCK_N]`` (and with GATED the up half's) to what is stored: plus the
    bias, ``silu(gate) * up`` rounded as ``silu_and_mul`` rounds it, plus the residual."""
    if HAS_BIAS:
        y += tl.load(bias_ptr + w_rows).to(tl.float32)[None, :]
    if GATED:
        if HAS_BIAS:
            up += tl.load(bias_ptr + N_UP + w_rows).to(tl.float32)[None, :]
        gate = y.to(out_ty).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(out_ty).to(tl.float32)
        y = silu * up.to(out_ty).to(tl.float32)
    if RESIDUAL:
        y += tl.load(res_ptr + offs_m[:, None] * stride_rm + offs_n[None, :], mask=out_mask, other=0.0).to(tl.float32)
    return y


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, part_ptr, count_ptr, res_ptr,
    M, N, K, K_SLICE, stride_xm, stride_wn, stride_ym, stride_rm, N_UP,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr,
    RESIDUAL: tl.constexpr, GATED: tl.constexpr,
):
    """One (block of ``BLOCK_N`` outputs, slice of K). SPLIT: partials + arrival counter (see module
    docstring); otherwise the program stores its outputs.

    Decode fusions (``gemv``'s ``residual`` / ``gated``): RESIDUAL adds ``res`` (which may be ``y``
    itself: each output is read and written by one program) to the result; GATED reads rows ``n`` and
    ``N_UP + n`` of W (gate and up) and stores ``silu(gate) * up`` as output ``n`` (unsplit only)."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    CHUNKS: tl.constexpr = BLOCK_K // VEC
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, M_PAD)
    # Clamped rows read real (duplicate) data; their results are never stored.
    w_rows = tl.minimum(offs_n, N - 1).to(tl.int64)
    x_rows = tl.minimum(offs_m, M - 1)
    # Both tiles are [M, BLOCK_N, BLOCK_K] pointer tensors (x's broadcast over N, w's over M) with K
    # contiguous, so they get the same layout and the product needs no conversion (x expanded from
    # [M, BLOCK_K] got its own layout, and a shared-memory round trip per step). x's repeated
    # addresses within a thread become one load in ptxas.
    offs_k = tl.arange(0, BLOCK_K)[None, None, :]
    w_tile = w_ptr + w_rows[None, :, None] * stride_wn + offs_k
    x_tile = x_ptr + x_rows[:, None, None] * stride_xm + offs_k + 0 * offs_n[None, :, None]
    k_begin = pid_k * K_SLICE
    k_end = tl.minimum(k_begin + K_SLICE, K)
    n_full = (k_end - k_begin) // BLOCK_K
    # The launcher keeps BLOCK_K <= K, so the first tile is in bounds even when this slice is only a
    # ragged tail (its data is then loaded but not used).
    w = tl.load(w_tile + tl.minimum(k_begin, K - BLOCK_K))
    if GATED:
        up_tile = w_tile + N_UP * stride_wn
        w_up = tl.load(up_tile + tl.minimum(k_begin, K - BLOCK_K))
    # Everything above reads only weights; x (and the workspace) may be the previous kernel's output.
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)

    acc = tl.zeros([M_PAD, BLOCK_N, CHUNKS], dtype=tl.float32)
    acc_up = tl.zeros([M_PAD, BLOCK_N, CHUNKS], dtype=tl.float32)  # GATED only
    last_full = k_begin + (n_full - 1) * BLOCK_K
    for i in range(n_full):
        k0 = k_begin + i * BLOCK_K
        # The last iteration reloads its own tile (an L1 hit) instead of branching.
        w_next = tl.load(w_tile + tl.minimum(k0 + BLOCK_K, last_full))
        acc += _tile_sum(w, x_tile + k0, None, False, M_PAD, BLOCK_N, CHUNKS, VEC)
        w = w_next
        if GATED:
            w_up_next = tl.load(up_tile + tl.minimum(k0 + BLOCK_K, last_full))
            acc_up += _tile_sum(w_up, x_tile + k0, None, False, M_PAD, BLOCK_N, CHUNKS, VEC)
            w_up = w_up_next
    tail = k_begin + n_full * BLOCK_K
    if tail < k_end:
        # A ragged end of K (only the last slice has one): the tile that ends at K, whose first part
        # was already counted. Its loads stay whole, unmasked vectors (masked x loads are not merged
        # across N by ptxas: M x BLOCK_N x VEC registers, spills); the products before `tail` drop out.
        last = K - BLOCK_K
        keep = last + offs_k >= tail
        w = tl.load(w_tile + last)
        acc += _tile_sum(w, x_tile + last, keep, True, M_PAD, BLOCK_N, CHUNKS, VEC)
        if GATED:
            w_up = tl.load(up_tile + last)
            acc_up += _tile_sum(w_up, x_tile + last, keep, True, M_PAD, BLOCK_N, CHUNKS, VEC)
    y = tl.sum(acc, axis=2)  # [M_PAD, BLOCK_N]
    up = tl.sum(acc_up, axis=2)

    out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    out_ty: tl.constexpr = y_ptr.dtype.element_ty
    if SPLIT:
        parts = part_ptr + offs_m[:, None] * N + offs_n[None, :]
        mn = M * N
        tl.store(parts + pid_k * mn, y, mask=out_mask)
        # Every thread's partial stores come before the arrival (the atomic is acq_rel, GPU scope).
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + pid_n, 1)
        n_splits = tl.num_programs(1)
        if arrived == n_splits - 1:
            # All slices, this one's too, in slice order: the sum does not depend on which came last.
            # .cg: read the other SMs' partials from L2, never a stale L1 line.
            y = tl.zeros([M_PAD, BLOCK_N], dtype=tl.float32)
            for s in range(n_splits):
                y += tl.load(parts + s * mn, mask=out_mask, other=0.0, cache_modifier=".cg")
            y = _epilogue(y, up, bias_ptr, res_ptr, w_rows, offs_m, offs_n, N_UP, stride_rm, out_mask,
                          out_ty, HAS_BIAS, RESIDUAL, False)
            tl.store(y_ptrs, y.to(out_ty), mask=out_mask)
            tl.store(count_ptr + pid_n, 0)
    else:
        y = _epilogue(y, up, bias_ptr, res_ptr, w_rows, offs_m, offs_n, N_UP, stride_rm, out_mask,
                      out_ty, HAS_BIAS, RESIDUAL, GATED)
        tl.store(y_ptrs, y.to(out_ty), mask=out_mask)


@triton.jit
def _gemv_persistent_kernel(
    x_ptr, w_ptr, bias_ptr, y_ptr, res_ptr,
    M, N, K, stride_xm, stride_wn, stride_ym, stride_rm, N_UP, NUM_BLOCKS,
    M_PAD: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
    EVEN_K: tl.constexpr, HAS_BIAS: tl.constexpr, USE_PDL: tl.constexpr,
    RESIDUAL: tl.constexpr, GATED: tl.constexpr,
):
    """The same GEMV on a grid sized to stay resident: program ``p`` takes row blocks ``p, p + grid,
    ...``, each over all of K (no split, no workspace), as one stream of ``[BLOCK_N, BLOCK_K]`` tiles in
    which the next tile, the next block's first included, is loaded before this one is used. So a
    program's loads never wait for its own epilogue, the tail of the launch is at most one block per
    program, and with PDL only the first tile comes before the wait. Fusions as ``_gemv_kernel``."""
    pid = tl.program_id(0)
    grid = tl.num_programs(0)
    CHUNKS: tl.constexpr = BLOCK_K // VEC
    offs_m = tl.arange(0, M_PAD)
    offs_b = tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)[None, None, :]
    x_rows = tl.minimum(offs_m, M - 1)
    x_tile = x_ptr + x_rows[:, None, None] * stride_xm + offs_k + 0 * offs_b[None, :, None]
    n_k = tl.cdiv(K, BLOCK_K)  # tiles per block; a ragged last one is the tile that ends at K
    my_tiles = tl.cdiv(NUM_BLOCKS - pid, grid) * n_k

    # Tile t of this program: block pid + (t // n_k) * grid, K offset min((t % n_k) * BLOCK_K, K - BLOCK_K).
    rows = tl.minimum(pid * BLOCK_N + offs_b, N - 1).to(tl.int64)
    w = tl.load(w_ptr + rows[None, :, None] * stride_wn + offs_k)
    w_up = w  # GATED only
    if GATED:
        w_up = tl.load(w_ptr + (rows + N_UP)[None, :, None] * stride_wn + offs_k)
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)

    acc = tl.zeros([M_PAD, BLOCK_N, CHUNKS], dtype=tl.float32)
    acc_up = tl.zeros([M_PAD, BLOCK_N, CHUNKS], dtype=tl.float32)  # GATED only
    for t in range(my_tiles):
        kt = t % n_k
        k0 = tl.minimum(kt * BLOCK_K, K - BLOCK_K)
        # The next tile (the last iteration reloads this one: an L1 hit).
        t_next = tl.minimum(t + 1, my_tiles - 1)
        b_next = pid + (t_next // n_k) * grid
        rows_next = tl.minimum(b_next * BLOCK_N + offs_b, N - 1).to(tl.int64)
        k_next = tl.minimum((t_next % n_k) * BLOCK_K, K - BLOCK_K)
        w_next = tl.load(w_ptr + rows_next[None, :, None] * stride_wn + k_next + offs_k)
        keep = k0 + offs_k >= kt * BLOCK_K  # a ragged tile's already-counted part drops out (not EVEN_K)
        acc += _tile_sum(w, x_tile + k0, keep, not EVEN_K, M_PAD, BLOCK_N, CHUNKS, VEC)
        w = w_next
        if GATED:
            w_up_next = tl.load(w_ptr + (rows_next + N_UP)[None, :, None] * stride_wn + k_next + offs_k)
            acc_up += _tile_sum(w_up, x_tile + k0, keep, not EVEN_K, M_PAD, BLOCK_N, CHUNKS, VEC)
            w_up = w_up_next
        if kt == n_k - 1:  # the block is done: store it
            offs_n = (pid + (t // n_k) * grid) * BLOCK_N + offs_b
            out_mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
            y = _epilogue(tl.sum(acc, axis=2), tl.sum(acc_up, axis=2), bias_ptr, res_ptr,
                          tl.minimum(offs_n, N - 1).to(tl.int64), offs_m, offs_n, N_UP, stride_rm, out_mask,
                          y_ptr.dtype.element_ty, HAS_BIAS, RESIDUAL, GATED)
            tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
                     mask=out_mask)
            acc = tl.zeros([M_PAD, BLOCK_N, CHUNKS], dtype=tl.float32)
            acc_up = tl.zeros([M_PAD, BLOCK_N, CHUNKS], dtype=tl.float32)


def split_workspace(device: torch.device, partial_numel: int, num_counters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fp32 partials (no initial value needed) and int32 arrival counters of a split launch."""
    return (scratch(device, "gemv partials", partial_numel, torch.float32),
            scratch(device, "split-K arrival counters", num_counters, torch.int32))


def _prev_power_of_2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


@dataclasses.dataclass(frozen=True)
class _Launch:
    m_pad: int
    block_n: int
    block_k: int
    vec: int
    k_slice: int
    splits: int
    num_warps: int
    pdl: bool


def _plan(m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, config: GemvConfig) -> _Launch:
    return _shape_plan(m, n, k, dtype, device, config, resolve_pdl(device, config.pdl))


@functools.lru_cache(maxsize=1024)  # a model has a handful of shapes; an eager step calls this ~100 times
def _shape_plan(
    m: int, n: int, k: int, dtype: torch.dtype, device: torch.device, config: GemvConfig, pdl: bool
) -> _Launch:
    vec = min(VECTOR_BYTES // dtype.itemsize, _prev_power_of_2(k))
    num_warps = config.num_warps
    block_k = config.block_k or vec * 32 * num_warps
    # Per thread: BLOCK_N weight vectors per tile (two tiles where ptxas overlaps them), M x vectors and
    # M x BLOCK_N sums; fewer rows as M grows keeps that under ~160 registers with no spills (sm_90,
    # Triton 3.6: 70-95 at M = 1, 96-128 at M = 2, 126-157 at M = 8).
    block_n = config.block_n or (8 if m <= 2 else 4)
    for name, value in (("block_k", block_k), ("block_n", block_n), ("num_warps", num_warps)):
        _checks.check_power_of_two(name, value)
    # BLOCK_K <= K keeps the first tile in bounds (see the kernel); a short K takes fewer warps so that
    # the tile still spans them all along K.
    block_k = max(min(block_k, _prev_power_of_2(k)), vec)
    while num_warps > 1 and block_k < vec * 32 * num_warps:
        num_warps //= 2
    block_n = min(block_n, triton.next_power_of_2(n))
    tiles = triton.cdiv(k, block_k)
    splits = config.splits
    if splits is None:
        splits = triton.cdiv(PROGRAMS_PER_SM * num_sms(device), triton.cdiv(n, block_n))
    if splits < 1:
        _checks.fail(f"splits must be >= 1, got {splits}")
    k_slice = triton.cdiv(tiles, min(splits, tiles)) * block_k
    return _Launch(triton.next_power_of_2(m), block_n, block_k, vec, k_slice, triton.cdiv(k, k_slice),
                   num_warps, pdl)


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None,
           gated: bool = False) -> None:
    """Metadata of x, the weight, the bias and ``out`` (``[M, N]``, or ``[M, N / 2]`` when ``gated``)."""
    _checks.check_float("x", x, 2)
    _checks.check_float("weight", weight, 2)
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    if x.shape[0] > GEMV_MAX_M:
        _checks.fail(f"x has {x.shape[0]} rows; the GEMV takes at most {GEMV_MAX_M} (use a matmul)")
    if weight.shape[1] != x.shape[1]:
        _checks.fail(f"weight {tuple(weight.shape)} must be [N, K] with K = x's {x.shape[1]} columns")
    if weight.dtype != x.dtype:
        _checks.fail(f"weight dtype {weight.dtype} must equal x's {x.dtype}")
    tensors = {"x": x, "weight": weight}
    if bias is not None:
        _checks.check_float("bias", bias, 1)
        if bias.shape[0] != weight.shape[0] or bias.dtype != x.dtype:
            _checks.fail(f"bias must be [{weight.shape[0]}] {x.dtype}, got {tuple(bias.shape)} {bias.dtype}")
        tensors["bias"] = bias
    if out is not None:
        expected = (x.shape[0], n_out)
        if tuple(out.shape) != expected or out.dtype != x.dtype or (out.numel() and out.stride(-1) != 1):
            _checks.fail(f"out must be {expected} {x.dtype} contiguous in its last dim, got "
                         f"{tuple(out.shape)} {out.dtype} strides {out.stride()}")
        tensors["out"] = out
    _checks.check_same_device(**tensors)


def _check_fusions(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None, gated: bool) -> None:
    if gated and weight.shape[0] % 2:
        _checks.fail(f"a gated weight stacks gate and up: its {weight.shape[0]} rows must be even")
    n_out = weight.shape[0] // 2 if gated else weight.shape[0]
    tensors = {"x": x}
    if residual is not None:
        _checks.check_float("residual", residual, 2)
        if tuple(residual.shape) != (x.shape[0], n_out) or residual.dtype != x.dtype:
            _checks.fail(f"residual must be {(x.shape[0], n_out)} {x.dtype}, "
                         f"got {tuple(residual.shape)} {residual.dtype}")
        tensors["residual"] = residual
    _checks.check_same_device(**tensors)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: GemvConfig | None = None,
    out: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
    gated: bool = False,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for ``x [M <= 8, K]`` and ``weight [N, K]`` (same dtype, fp32
    accumulation), in ``x.dtype``. ``out`` is an optional preallocated ``[M, N]`` output.

    Decode fusions, each removing a kernel launch from a decoder layer:

    - ``gated``: ``weight`` stacks gate over up (``[2 I, K]``), the output is ``silu_and_mul`` of the
      linear, ``[M, I]`` (always unsplit);
    - ``residual [M, N]``: added to the result; ``out=residual`` updates it in place.

    Only metadata is checked (no index tensors, so no value checks and nothing for
    ``trusted_inputs()`` to skip). With PDL the first weight tile is read before waiting for the kernel
    launched just before this one, so ``weight`` must not be that kernel's output (model weights never
    are).
    """
    _check(x, weight, bias, out, gated)
    _check_fusions(x, weight, residual, gated)
    m, k = x.shape
    n = weight.shape[0] // 2 if gated else weight.shape[0]
    if out is None:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out
    if k == 0 and not (residual is not None or gated):  # an empty sum: the bias or zeros, as F.linear gives
        return out.copy_(bias.expand(m, n) if bias is not None else torch.zeros_like(out))
    if k == 0:
        _checks.fail("the decode fusions need K > 0")
    config = config or GemvConfig()
    if gated:
        # The gate and up halves of an output meet in one program (unsplit), which reads rows of both:
        # half the default rows of each keeps the loads per thread, and the registers, of a plain launch.
        config = dataclasses.replace(config, splits=1, block_n=config.block_n or (4 if m <= 2 else 2))
    plan = _plan(m, n, k, x.dtype, x.device, config)
    blocks = triton.cdiv(n, plan.block_n)
    if config.persistent:
        grid = max(1, min(blocks, config.programs_per_sm * num_sms(x.device)))
        _gemv_persistent_kernel[(grid,)](
            x, weight, bias if bias is not None else weight, out, residual if residual is not None else out,
            m, n, k, x.stride(0), weight.stride(0), out.stride(0),
            residual.stride(0) if residual is not None else 0, n, blocks,
            M_PAD=plan.m_pad, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, VEC=plan.vec, EVEN_K=k % plan.block_k == 0,
            HAS_BIAS=bias is not None, RESIDUAL=residual is not None, GATED=gated,
            num_warps=plan.num_warps, **pdl_launch(plan.pdl),
        )
        return out
    if plan.splits > 1:
        if plan.splits * m * n >= 2**31:
            _checks.fail(f"split workspace of {plan.splits} x {m} x {n} is too large for int32 offsets")
        partials, counters = split_workspace(x.device, plan.splits * m * n, blocks)
    else:
        partials = counters = out  # unused
    _gemv_kernel[(blocks, plan.splits)](
        x, weight, bias if bias is not None else weight, out, partials, counters,
        residual if residual is not None else out,
        m, n, k, plan.k_slice, x.stride(0), weight.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0, n,
        M_PAD=plan.m_pad, BLOCK_N=plan.block_n, BLOCK_K=plan.block_k, VEC=plan.vec,
        SPLIT=plan.splits > 1, HAS_BIAS=bias is not None, RESIDUAL=residual is not None,
        GATED=gated, num_warps=plan.num_warps, **pdl_launch(plan.pdl),
    )
    return out


def _takes_gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether a linear of ``x [..., K]`` goes to the GEMV: at most ``LINEAR_MAX_ROWS`` rows, with PDL,
    one dtype, K contiguous, no autograd."""
    k = x.shape[-1]
    rows = x.numel() // k if k else 0
    return (
        0 < rows <= LINEAR_MAX_ROWS
        and pdl_enabled(x.device)
        and x.dtype == weight.dtype
        and x.stride(-1) == 1
        and weight.stride(-1) == 1
        and (bias is None or (bias.dtype == x.dtype and bias.stride(-1) == 1))
        and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
    )


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` with the GEMV where it was measured faster (``x [..., K]`` of at most
    ``LINEAR_MAX_ROWS`` rows, with PDL) and ``F.linear`` for everything else (larger batches, no PDL,
    autograd, mixed dtypes, strided K)."""
    if not _takes_gemv(x, weight, bias):
        return F.linear(x, weight, bias)
    k = x.shape[-1]
    y = gemv(x.reshape(-1, k), weight, bias, config=MODEL_LAUNCH)
    return y.view(*x.shape[:-1], weight.shape[0])


# The decode fusions as a decoder layer calls them (``reference.norm_linear`` & co. give the semantics):
# the fused GEMV where ``linear`` would take the GEMV, the separate kernels otherwise. The model takes
# its fused layer path only for batches the GEMV takes (``decode_fusion_rows``). Timed one at a time on
# an H200 (RESULTS.md, fourth session; 1.1B decode step at batch 1 in a CUDA graph, 1.057 ms with all
# three): taking the gating out of gate_up's GEMV cost 27 us, taking the residual adds out of o_proj's
# and down_proj's 81 us, while taking the RMSNorm out of the next GEMV (x scaled by the norm weight in
# the products, 1/rms in the epilogue) saved 32 us. So the norm stays a kernel of its own. With it
# apart (1.025 ms) the gating is worth 12 us and the residual adds 35; the layer path without any of
# them, whose norm kernel adds the residual itself, took 1.028.


def decode_fusion_rows(device: torch.device) -> int:
    """Rows up to which the decoder takes its fused layer path (0: never): the batches the GEMV takes."""
    return LINEAR_MAX_ROWS if pdl_enabled(device) else 0


def _fuses(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, *others: torch.Tensor) -> bool:
    """Whether a decode fusion takes the fused GEMV: where ``linear`` would take the GEMV for a 2-d ``x``,
    with its other tensors (the residual) in x's dtype and contiguous along the row."""
    return (x.dim() == 2 and _takes_gemv(x, weight, bias)
            and all(t.dtype == x.dtype and t.stride(-1) == 1 for t in others))


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(rms_norm(x, norm_weight, eps), weight, bias)``: two launches (see above)."""
    return linear(rms_norm(x, norm_weight, eps), weight, bias)


def norm_gated_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu_and_mul(linear(rms_norm(x, norm_weight, eps), weight, bias))``: ``weight`` stacks gate and up;
    the norm, then the GEMV with the gating in its epilogue."""
    normed = rms_norm(x, norm_weight, eps)
    if _fuses(normed, weight, bias):
        return gemv(normed, weight, bias, config=MODEL_LAUNCH, gated=True)
    return silu_and_mul(linear(normed, weight, bias))


def linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x, weight, bias)``, written into ``residual`` (the decoder's residual stream)."""
    if _fuses(x, weight, bias, residual):
        return gemv(x, weight, bias, config=MODEL_LAUNCH, residual=residual, out=residual)
    return residual.add_(linear(x, weight, bias))
