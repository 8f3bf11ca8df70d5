"""Triton paged attention: split-KV decode (flash-decoding) and variable-length causal prefill.

Semantics and layouts are those of ``reference.paged_decode_attention`` / ``paged_prefill_attention``
(read ``reference.py`` first). Both kernels gather K/V through the block table a tile of ``BLOCK_N``
tokens at a time (each token row of ``head_dim`` values is contiguous, so the gather stays coalesced)
and run an online softmax in fp32 with base-2 exponentials (the scale is pre-multiplied by log2(e)).
Q.K and P.V use ``tl.dot``: fp16/bf16 operands on tensor cores with fp32 accumulation (P is rounded to
the value dtype, as in flash attention), fp32 operands in full IEEE precision (no TF32).

A split decode is two launches: the partitions, then ``_decode_reduce_kernel`` merging them (skipped
for contexts that fit one partition). A sequence with an empty context gets an all-zero output (the
reference does the same). On sm_90+ (unless ``LEANSERVE_PDL=0``) the decode kernels are launched with
programmatic dependent launch (``_pdl.py``); every input of them comes from the step, so they wait
first and only gain the earlier launch.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _checks
from ._device import num_sms, pdl_enabled
from ._pdl import pdl_launch, pdl_launch_dependents, pdl_wait

LOG2E = 1.4426950408889634

# Decode tiles: BLOCK_N keys per step (halved for head_dim > 128 so the pipelined K/V tiles fit in
# shared memory). The query tile is the group's heads padded to 16 rows, the smallest tl.dot M, so one
# program reads its KV head once for all the query heads sharing it.
DECODE_BLOCK_N = 64
MIN_DOT = 16
# Split-KV heuristic: a partition of fewer keys than this is not worth its merge. On an H200, TinyLlama's
# decode in a graph sized for 2048 tokens, us per launch at 1 / 8 sequences of 512 / 2048 keys, with the
# reduce kernel (benchmarks/kernels.py --decode-graph-sweep, RESULTS.md): 128 keys 5.3 / 5.4 / 7.5 / 11.0;
# 256 keys 7.2 / 7.3 / 8.9 / 9.1; 512 keys 10.7 / 11.3 / 11.1 / 11.8; unsplit 9.9 / 34.2 / 10.0 / 34.4.
# 128 has the lowest sum and wins at one sequence, the decode step's bar.
MIN_PARTITION_TOKENS = 128
MAX_PARTITIONS = 64
# Prefill tiles: BLOCK_M queries x BLOCK_N keys (halved for head_dim 256 to stay in registers).
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise be rounded to TF32 on the GPU (~1e-3 error).
    return "ieee" if dtype == torch.float32 else "tf32"


@triton.jit
def _page_slots(table_row, offs_n, mask_n, num_blocks, PAGE: tl.constexpr):
    """Cache block and in-block slot ``[BLOCK_N, 1]`` of tokens ``offs_n`` of one sequence (its block-table
    row ``table_row``). Only entries where ``mask_n`` holds are read (the rest of the row may hold
    anything), and block ids are clamped into the cache."""
    block = tl.load(table_row + offs_n // PAGE, mask=mask_n, other=0)
    block = tl.minimum(tl.maximum(block, 0), num_blocks - 1).to(tl.int64)
    return block[:, None], (offs_n % PAGE)[:, None]


@triton.jit
def _load_paged(cache_ptr, block, slot, head, stride_b, stride_t, stride_h, offs_d, mask):
    """``[BLOCK_N, BLOCK_D]`` of one head's rows of a K or V cache at (block, slot)."""
    return tl.load(cache_ptr + block * stride_b + slot * stride_t + head * stride_h + offs_d[None, :],
                   mask=mask, other=0.0)


@triton.jit
def _decode_partition_kernel(
    q_ptr, k_ptr, v_ptr, table_ptr, lens_ptr, out_ptr, max_ptr, sum_ptr, final_ptr,
    scale_log2, ctx_limit, num_blocks, min_partition,
    stride_qs, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_table,
    stride_os, stride_oh, stride_op,
    stride_ms, stride_mh,
    stride_fs, stride_fh,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One (sequence, kv head, partition): attention of the group's query heads over its key range.

    The sequence's own context is cut into at most ``num_programs(2)`` partitions of at least
    ``min_partition`` keys, so a graph launched for the longest context a sequence may reach pays for
    the context it has: partitions past the last live one do nothing, and a context that fits one
    partition is written out directly, with no merge.

    SPLIT (several live partitions): write the unnormalised accumulator plus the running max and sum
    (log2 domain) to the partials (``out_ptr``, ``max_ptr``, ``sum_ptr``) for ``_decode_reduce_kernel``.
    Without SPLIT, or with one live partition, the normalised output goes straight to ``out_ptr``
    (``final_ptr`` under SPLIT).
    """
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    part = tl.program_id(2)

    # Clamped so that bad lengths cannot read past the block table (the launcher rejects them anyway).
    ctx = tl.minimum(tl.maximum(tl.load(lens_ptr + seq), 0), ctx_limit)
    part_size, live = _live_partitions(ctx, tl.num_programs(2), min_partition, BLOCK_N)
    if part < live:
        start = part * part_size
        end = tl.minimum(start + part_size, ctx)

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        mask_g = offs_g < GROUP
        mask_d = offs_d < HEAD_DIM
        heads = kv_head * GROUP + offs_g
        q = tl.load(
            q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
            mask=mask_g[:, None] & mask_d[None, :], other=0.0,
        )

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        table_row = table_ptr + seq.to(tl.int64) * stride_table
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < end
            block, slot = _page_slots(table_row, offs_n, mask_n, num_blocks, PAGE)
            kv_mask = mask_n[:, None] & mask_d[None, :]
            k = _load_paged(k_ptr, block, slot, kv_head, stride_kb, stride_kt, stride_kh, offs_d, kv_mask)
            scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
            scores = tl.where(mask_n[None, :], scores, float("-inf"))
            # Every tile holds at least one key, so m_new is finite.
            m_new = tl.maximum(m_i, tl.max(scores, 1))
            p = tl.exp2(scores - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _load_paged(v_ptr, block, slot, kv_head, stride_vb, stride_vt, stride_vh, offs_d, kv_mask)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
            m_i = m_new

        out_mask = mask_g[:, None] & mask_d[None, :]
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        if SPLIT:
            if live > 1:
                base = seq * stride_os + heads * stride_oh + part * stride_op
                tl.store(out_ptr + base[:, None] + offs_d[None, :], acc, mask=out_mask)
                stat = seq * stride_ms + heads * stride_mh + part
                tl.store(max_ptr + stat, m_i, mask=mask_g)
                tl.store(sum_ptr + stat, l_i, mask=mask_g)
            else:
                ptrs = final_ptr + seq * stride_fs + heads[:, None] * stride_fh + offs_d[None, :]
                tl.store(ptrs, out.to(final_ptr.dtype.element_ty), mask=out_mask)
        else:
            ptrs = out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :]
            tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _live_partitions(ctx, num_parts, min_partition, BLOCK_N: tl.constexpr):
    """A context's partition length (a tile multiple, at least ``min_partition``) and how many of the
    ``num_parts`` partitions hold keys (at least one, so an empty context still writes zeros)."""
    part_size = tl.maximum(tl.cdiv(tl.cdiv(ctx, num_parts), BLOCK_N) * BLOCK_N, min_partition)
    return part_size, tl.maximum(tl.cdiv(ctx, part_size), 1)


@triton.jit
def _decode_reduce_kernel(
    part_ptr, max_ptr, sum_ptr, out_ptr, lens_ptr, ctx_limit, num_parts, min_partition,
    stride_ps, stride_ph, stride_pp, stride_ms, stride_mh, stride_os, stride_oh,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One (sequence, query head): merge its live partitions' partial softmax results into ``out``. A
    context that fitted one partition was written by the partition kernel; nothing to do here.

    A separate launch rather than a merge by the last partition to arrive (arrival counter, CTA
    barrier, acq_rel atomic). On an H200 (benchmarks/RESULTS.md) this version took TinyLlama's batch-1
    decode step under CUDA graphs from 1.154 to 1.100 ms, and 4 sequences x 32k keys from 0.177 to
    0.164 ms; the batch-1 attention itself stayed at ~215 us over 22 layers (partitions 184, this
    kernel 31).
    """
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    seq = tl.program_id(0)
    head = tl.program_id(1)
    ctx = tl.minimum(tl.maximum(tl.load(lens_ptr + seq), 0), ctx_limit)
    _, live = _live_partitions(ctx, num_parts, min_partition, BLOCK_N)
    if live > 1:
        offs_p = tl.arange(0, BLOCK_P)
        offs_d = tl.arange(0, BLOCK_D)
        mask_p = offs_p < live
        mask_d = offs_d < HEAD_DIM
        stat = seq * stride_ms + head * stride_mh + offs_p
        m = tl.load(max_ptr + stat, mask=mask_p, other=float("-inf"))
        total = tl.load(sum_ptr + stat, mask=mask_p, other=0.0)
        part = tl.load(
            part_ptr + seq * stride_ps + head * stride_ph + offs_p[:, None] * stride_pp + offs_d[None, :],
            mask=mask_p[:, None] & mask_d[None, :], other=0.0,
        )
        # Every live partition holds at least one key, so m_all is finite.
        m_all = tl.max(m, 0)
        w = tl.exp2(m - m_all)
        total = tl.sum(total * w, 0)
        out = tl.sum(part * w[:, None], 0) / total
        tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
                 mask=mask_d)


@triton.jit
def _prefill_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, table_ptr, cu_q_ptr, lens_ptr, cu_tiles_ptr,
    scale_log2, num_seqs, num_blocks, ctx_limit, search_steps,
    stride_qt, stride_qh,
    stride_kb, stride_kt, stride_kh,
    stride_vb, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_table,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PAGE: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    """One (query tile, head). Tiles of all sequences are numbered back to back (``cu_tiles``)."""
    tile = tl.program_id(0)
    head = tl.program_id(1)
    # The grid is an upper bound on the tile count (it is sized without a host sync).
    if tile >= tl.load(cu_tiles_ptr + num_seqs):
        return
    # Binary search for the sequence owning this tile: the largest b with cu_tiles[b] <= tile.
    lo = tl.zeros([], dtype=tl.int32)
    hi = tl.zeros([], dtype=tl.int32) + num_seqs
    for _ in range(search_steps):
        mid = (lo + hi) // 2
        right = tl.load(cu_tiles_ptr + mid) <= tile
        lo = tl.where(right, mid, lo)
        hi = tl.where(right, hi, mid)
    seq = lo

    q_start = tl.load(cu_q_ptr + seq).to(tl.int32)
    q_len = tl.load(cu_q_ptr + seq + 1).to(tl.int32) - q_start
    ctx = tl.minimum(tl.maximum(tl.load(lens_ptr + seq), 0), ctx_limit)
    first = (tile - tl.load(cu_tiles_ptr + seq)) * BLOCK_M  # first query of the tile within its chunk

    offs_m = first + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < q_len
    mask_d = offs_d < HEAD_DIM
    positions = ctx - q_len + offs_m  # absolute positions of the queries in their sequence
    rows = (q_start + offs_m).to(tl.int64)
    q = tl.load(
        q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )

    kv_head = head // GROUP
    # Keys past the tile's last query are causally invisible to all of its rows.
    end = tl.minimum(ctx, ctx - q_len + tl.minimum(first + BLOCK_M, q_len))
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    table_row = table_ptr + seq.to(tl.int64) * stride_table
    for n0 in range(0, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < end
        block, slot = _page_slots(table_row, offs_n, mask_n, num_blocks, PAGE)
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = _load_paged(k_ptr, block, slot, kv_head, stride_kb, stride_kt, stride_kh, offs_d, kv_mask)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * scale_log2
        visible = mask_n[None, :] & (offs_n[None, :] <= positions[:, None])
        scores = tl.where(visible, scores, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        # A row can see nothing in a tile only if it is a padding row or the input is invalid;
        # keep it NaN-free either way.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(scores - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_paged(v_ptr, block, slot, kv_head, stride_vb, stride_vt, stride_vh, offs_d, kv_mask)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    tl.store(
        out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :],
    )


def _num_stages(head_dim: int) -> int:
    # Pipelining depth of the K/V loads: 3 buffers fit for head_dim <= 128; 256 needs to stay at 2.
    return 3 if head_dim <= 128 else 2


def choose_num_partitions(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int) -> int:
    """How many KV partitions each (sequence, kv head) is split into.

    Without splitting the grid has one program per (sequence, kv head); with few long sequences that
    leaves most SMs idle while each program walks a long context. A grid of at least two programs per
    SM is left whole; a smaller one is split until it covers about four programs per SM (H200, 4
    sequences x 32k keys, 8 KV heads: 9 partitions 0.164 ms, 16 0.134-0.138, 32 0.137-0.139, 64
    0.141-0.152; RESULTS.md), keeping every partition at least MIN_PARTITION_TOKENS long so the extra
    partial writes and the merge stay small next to the K/V reads.
    """
    programs = max(num_seqs * num_kv_heads, 1)
    wanted = 1 if programs >= 2 * num_sms else math.ceil(4 * num_sms / programs)
    by_length = max_context_len // MIN_PARTITION_TOKENS
    return max(1, min(wanted, by_length, MAX_PARTITIONS))


def _scratch(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Its own function so tests can poison the partials (every element must be written).
    return torch.empty(shape, dtype=torch.float32, device=device)


def _check_out(out: torch.Tensor, query: torch.Tensor) -> None:
    if out.shape != query.shape or out.dtype != query.dtype or out.device != query.device:
        _checks.fail(f"out must be {tuple(query.shape)} {query.dtype} on {query.device}")
    if out.numel() and out.stride(-1) != 1:
        _checks.fail(f"out must be contiguous in its last dim, got strides {out.stride()}")


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int | None = None,
    *,
    num_partitions: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton ``reference.paged_decode_attention``. ``query [num_seqs, num_heads, head_dim]``.

    ``max_context_len`` (an upper bound on ``context_lens``) only sizes the split; without it the table
    width is used, so no host sync is needed. ``num_partitions`` forces the split (1 = no split);
    ``out`` is an optional preallocated output.
    """
    _checks.check_float("query", query, 3)
    _checks.check_cache_pair(k_cache, v_cache)
    _checks.check_attention_meta(query, k_cache, block_tables, context_lens)
    _checks.check_same_device(
        query=query, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables, context_lens=context_lens
    )
    if out is None:
        out = torch.empty_like(query)
    _check_out(out, query)
    num_seqs, num_heads, head_dim = query.shape
    num_blocks, page, num_kv_heads, _ = k_cache.shape
    capacity = block_tables.shape[1] * page
    ctx_limit = capacity if max_context_len is None else min(int(max_context_len), capacity)
    if ctx_limit < 0:
        _checks.fail(f"max_context_len must be >= 0, got {max_context_len}")
    if num_partitions is not None and num_partitions < 1:
        _checks.fail(f"num_partitions must be >= 1, got {num_partitions}")
    if num_seqs == 0:
        return out
    if num_blocks == 0:
        _checks.fail("the cache has no blocks")
    if _checks.value_checks_enabled():
        tensors = (block_tables, context_lens)
        scalars = (num_blocks, page, max_context_len)
        if not _checks.already_validated("decode", tensors, scalars):
            _checks.check_table_values(block_tables, context_lens, num_blocks, page)
            if max_context_len is not None:
                _checks.raise_if(
                    (context_lens > max_context_len).any(),
                    lambda: f"context_lens exceed max_context_len {max_context_len}",
                )
            _checks.remember_validated("decode", tensors, scalars)

    group = num_heads // num_kv_heads
    block_n = DECODE_BLOCK_N if head_dim <= 128 else DECODE_BLOCK_N // 2
    parts = num_partitions or choose_num_partitions(num_seqs, num_kv_heads, ctx_limit, num_sms(query.device))
    # The kernel sizes each sequence's partitions from its own context, no shorter than this (a forced
    # split cuts as finely as the tiles allow).
    min_partition = block_n if num_partitions else triton.cdiv(MIN_PARTITION_TOKENS, block_n) * block_n
    pdl = pdl_enabled(query.device)
    common = dict(
        GROUP=group, BLOCK_G=max(MIN_DOT, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_N=block_n, PAGE=page,
        DOT_PRECISION=_dot_precision(query.dtype), num_warps=4, num_stages=_num_stages(head_dim),
        **pdl_launch(pdl),
    )
    strides = (
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
    )
    grid = (num_seqs, num_kv_heads, parts)
    if parts == 1:
        _decode_partition_kernel[grid](
            query, k_cache, v_cache, block_tables, context_lens, out, out, out, out,
            scale * LOG2E, ctx_limit, num_blocks, min_partition, *strides,
            out.stride(0), out.stride(1), 0, 0, 0, 0, 0, SPLIT=False, **common,
        )
        return out
    partial = _scratch((num_seqs, num_heads, parts, head_dim), query.device)
    maxes = _scratch((num_seqs, num_heads, parts), query.device)
    sums = _scratch((num_seqs, num_heads, parts), query.device)
    _decode_partition_kernel[grid](
        query, k_cache, v_cache, block_tables, context_lens, partial, maxes, sums, out,
        scale * LOG2E, ctx_limit, num_blocks, min_partition, *strides,
        partial.stride(0), partial.stride(1), partial.stride(2), maxes.stride(0), maxes.stride(1),
        out.stride(0), out.stride(1), SPLIT=True, **common,
    )
    _decode_reduce_kernel[(num_seqs, num_heads)](
        partial, maxes, sums, out, context_lens, ctx_limit, parts, min_partition,
        partial.stride(0), partial.stride(1), partial.stride(2), maxes.stride(0), maxes.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_D=common["BLOCK_D"], BLOCK_N=block_n, BLOCK_P=triton.next_power_of_2(parts),
        num_warps=4, **pdl_launch(pdl),
    )
    return out


def _check_prefill_values(
    query: torch.Tensor, cu_seqlens_q: torch.Tensor, context_lens: torch.Tensor
) -> None:
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    bad = (
        (cu_seqlens_q[0] != 0)
        | (cu_seqlens_q[-1] != query.shape[0])
        | (q_lens < 0).any()
        | (q_lens > context_lens).any()
    )
    _checks.raise_if(
        bad,
        lambda: "cu_seqlens_q must start at 0, not decrease, end at num_tokens "
        f"{query.shape[0]}, and give no chunk longer than its context: cu_seqlens_q="
        f"{cu_seqlens_q[:16].tolist()}, context_lens={context_lens[:16].tolist()}",
    )


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    *,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Triton ``reference.paged_prefill_attention``: one launch for all chunks, no host sync."""
    _checks.check_float("query", query, 3)
    _checks.check_cache_pair(k_cache, v_cache)
    _checks.check_attention_meta(query, k_cache, block_tables, context_lens)
    _checks.check_index("cu_seqlens_q", cu_seqlens_q, 1, (torch.int32, torch.int64))
    _checks.check_same_device(
        query=query, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
        cu_seqlens_q=cu_seqlens_q, context_lens=context_lens,
    )
    num_seqs = context_lens.shape[0]
    if cu_seqlens_q.shape[0] != num_seqs + 1:
        _checks.fail(
            f"cu_seqlens_q must have num_seqs + 1 = {num_seqs + 1} entries, got {cu_seqlens_q.shape[0]}"
        )
    if out is None:
        out = torch.empty_like(query)
    _check_out(out, query)
    num_tokens, num_heads, head_dim = query.shape
    num_blocks, page, num_kv_heads, _ = k_cache.shape
    if num_tokens == 0 or num_seqs == 0:
        return out
    if num_blocks == 0:
        _checks.fail("the cache has no blocks")
    if _checks.value_checks_enabled():
        tensors = (block_tables, context_lens, cu_seqlens_q)
        scalars = (num_blocks, page, num_tokens)
        if not _checks.already_validated("prefill", tensors, scalars):
            _checks.check_table_values(block_tables, context_lens, num_blocks, page)
            _check_prefill_values(query, cu_seqlens_q, context_lens)
            _checks.remember_validated("prefill", tensors, scalars)

    block_m = PREFILL_BLOCK_M
    block_n = PREFILL_BLOCK_N if head_dim <= 128 else PREFILL_BLOCK_N // 2
    # Tile numbering on the device; the grid takes an upper bound (each chunk wastes < 1 tile).
    q_lens = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.int32)
    tiles = (q_lens + block_m - 1) // block_m
    cu_tiles = torch.nn.functional.pad(torch.cumsum(tiles, 0, dtype=torch.int32), (1, 0))
    max_tiles = triton.cdiv(num_tokens, block_m) + num_seqs
    grid = (max_tiles, num_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, out, block_tables, cu_seqlens_q, context_lens, cu_tiles,
        scale * LOG2E, num_seqs, num_blocks, block_tables.shape[1] * page,
        max(num_seqs - 1, 0).bit_length() + 1,
        query.stride(0), query.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        out.stride(0), out.stride(1),
        block_tables.stride(0),
        GROUP=num_heads // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_M=block_m, BLOCK_N=block_n,
        PAGE=page, DOT_PRECISION=_dot_precision(query.dtype), num_warps=4,
        num_stages=_num_stages(head_dim),
    )
    return out
