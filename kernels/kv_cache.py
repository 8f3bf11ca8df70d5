"""Triton KV-cache write: scatter the step's keys/values into their paged cache slots.

Semantics of ``reference.write_kv_cache``: token ``t`` goes to flat slot ``slot_mapping[t]``
(``block * block_size + offset``); slot ``-1`` marks padding and writes nothing. One program per
token moves all of its KV heads, so each program touches two contiguous ``[kv_heads, head_dim]``
rows per tensor. ``key``/``value`` may be strided views (e.g. slices of a fused QKV output) as long
as ``head_dim`` is contiguous; values are converted to the cache dtype on the way. On
sm_90+ (unless ``LEANSERVE_PDL=0``) it is launched with programmatic dependent launch (``_pdl.py``).

``write_kv_cache_rotary`` is the decoder's form: the rotary embedding of the step's queries and keys
(``fused_layers.apply_rotary``) and this write in one launch per step and layer instead of two, the
keys written to the cache straight from the registers that rotated them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _checks
from ._device import pdl_enabled
from ._pdl import pdl_launch, pdl_launch_dependents, pdl_wait
from .fused_layers import _rotary_row, _rotate_heads, _rotated_heads, check_rotary_args


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr, num_slots,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    PAGE: tl.constexpr, USE_PDL: tl.constexpr,
):
    # Before anything, padding programs included: a program that exits without waiting could let
    # this kernel complete ahead of the one it depends on.
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    # -1 is padding; other out-of-range slots are rejected by the launcher, and skipping them here
    # keeps a skipped check harmless.
    if (slot < 0) | (slot >= num_slots):
        return
    block = slot // PAGE
    offset = slot % PAGE
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    row = token.to(tl.int64)

    k = tl.load(key_ptr + row * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kct + offs_h[:, None] * stride_kch
    tl.store(k_dst + offs_d[None, :], k.to(k_cache_ptr.dtype.element_ty), mask=mask)

    v = tl.load(value_ptr + row * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct + offs_h[:, None] * stride_vch
    tl.store(v_dst + offs_d[None, :], v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_write_kv_kernel(
    q_ptr, key_ptr, value_ptr, pos_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    num_slots, n_heads, max_position,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
    stride_kcb, stride_kct, stride_kch, stride_vcb, stride_vct, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr,
    BLOCK_HALF: tl.constexpr, PAGE: tl.constexpr, USE_PDL: tl.constexpr,
):
    """One token: its query heads rotated in place; its key heads rotated in place and into the cache
    slot, its value heads copied there (padding tokens, slot -1, are rotated but not written)."""
    token = tl.program_id(0).to(tl.int64)
    # Positions, q/k/v and slots may all be outputs of earlier kernels: nothing to prefetch.
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    cos, sin = _rotary_row(pos_ptr, token, cos_ptr, sin_ptr, stride_cos, max_position, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, token, cos, sin, stride_qt, stride_qh, n_heads, BLOCK_H, HALF, BLOCK_HALF)
    # Rounded to the key's dtype, then to the cache's: what the two unfused kernels store.
    k_src, mask, r1, r2 = _rotated_heads(key_ptr, token, cos, sin, stride_kt, stride_kh, NUM_KV_HEADS,
                                         BLOCK_KVH, HALF, BLOCK_HALF)
    tl.store(k_src, r1, mask=mask)
    tl.store(k_src + HALF, r2, mask=mask)
    offs_h = tl.arange(0, BLOCK_KVH)
    offs_d = tl.arange(0, BLOCK_HALF)

    # -1 is padding; other out-of-range slots are rejected by the launcher, and masked here too.
    slot = tl.load(slot_ptr + token).to(tl.int64) + tl.zeros([BLOCK_KVH, BLOCK_HALF], dtype=tl.int64)
    write = mask & (slot >= 0) & (slot < num_slots)
    slot = tl.maximum(slot, 0)
    block = slot // PAGE
    offset = slot % PAGE
    k_dst = k_cache_ptr + block * stride_kcb + offset * stride_kct + offs_h[:, None] * stride_kch + offs_d[None, :]
    tl.store(k_dst, r1.to(k_cache_ptr.dtype.element_ty), mask=write)
    tl.store(k_dst + HALF, r2.to(k_cache_ptr.dtype.element_ty), mask=write)
    v_src = value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :]
    v_dst = v_cache_ptr + block * stride_vcb + offset * stride_vct + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(v_dst, tl.load(v_src, mask=write).to(v_cache_ptr.dtype.element_ty), mask=write)
    tl.store(v_dst + HALF, tl.load(v_src + HALF, mask=write).to(v_cache_ptr.dtype.element_ty), mask=write)


def _check(
    key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    _checks.check_float("key", key, 3)
    _checks.check_float("value", value, 3)
    _checks.check_cache_pair(k_cache, v_cache)
    _checks.check_index("slot_mapping", slot_mapping, 1, (torch.int64,))
    _checks.check_same_device(
        key=key, value=value, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping
    )
    expected = (slot_mapping.shape[0], k_cache.shape[2], k_cache.shape[3])
    for name, t in (("key", key), ("value", value)):
        if tuple(t.shape) != expected:
            _checks.fail(
                f"{name} must be [num_tokens, num_kv_heads, head_dim] = {expected} to match "
                f"slot_mapping and the cache, got {tuple(t.shape)}"
            )


def _check_slot_values(slot_mapping: torch.Tensor, num_slots: int) -> None:
    if _checks.value_checks_enabled() and not _checks.already_validated("kv", (slot_mapping,), (num_slots,)):
        bad = (slot_mapping < -1) | (slot_mapping >= num_slots)
        _checks.raise_if(
            bad.any(),
            lambda: "slot_mapping must hold -1 or a slot in [0, num_blocks * block_size = "
            f"{num_slots}), got {slot_mapping[bad][:8].tolist()}",
        )
        _checks.remember_validated("kv", (slot_mapping,), (num_slots,))


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Triton ``reference.write_kv_cache``: ``key``/``value [num_tokens, num_kv_heads, head_dim]``."""
    _check(key, value, k_cache, v_cache, slot_mapping)
    num_tokens = slot_mapping.shape[0]
    num_blocks, page, num_kv_heads, head_dim = k_cache.shape
    num_slots = num_blocks * page
    if num_tokens == 0:
        return
    _check_slot_values(slot_mapping, num_slots)
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, num_slots,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), PAGE=page, num_warps=4, **pdl_launch(pdl_enabled(key.device)),
    )


def write_kv_cache_rotary(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``reference.write_kv_cache_rotary``: ``apply_rotary`` then ``write_kv_cache`` of the rotated
    keys, in one launch. ``query``/``key`` are rotated in place (strided views are fine) and returned."""
    check_rotary_args(query, key, positions, cos, sin)
    _check(key, value, k_cache, v_cache, slot_mapping)
    num_tokens, n_heads, head_dim = query.shape
    num_blocks, page, num_kv_heads, _ = k_cache.shape
    num_slots = num_blocks * page
    if num_tokens == 0:
        return query, key
    _check_slot_values(slot_mapping, num_slots)
    half = head_dim // 2
    _rotary_write_kv_kernel[(num_tokens,)](
        query, key, value, positions, cos, sin, k_cache, v_cache, slot_mapping,
        num_slots, n_heads, cos.shape[0],
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HALF=half, BLOCK_H=triton.next_power_of_2(n_heads),
        BLOCK_KVH=triton.next_power_of_2(num_kv_heads), BLOCK_HALF=triton.next_power_of_2(half), PAGE=page,
        num_warps=4, **pdl_launch(pdl_enabled(query.device)),
    )
    return query, key
