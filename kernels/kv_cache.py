"""Triton KV-cache write: scatter the step's keys/values into their paged cache slots.

Semantics of ``reference.write_kv_cache``: token ``t`` goes to flat slot ``slot_mapping[t]``
(``block * block_size + offset``); slot ``-1`` marks padding and writes nothing. One program per
token moves all of its KV heads, so each program touches two contiguous ``[kv_heads, head_dim]``
rows per tensor. ``key``/``value`` may be strided views (e.g. slices of a fused QKV output) as long
as ``head_dim`` is contiguous; values are converted to the cache dtype on the way. On
sm_90+ (unless ``LEANSERVE_PDL=0``) it is launched with programmatic dependent launch (``_pdl.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _checks
from ._device import pdl_enabled
from ._pdl import pdl_launch, pdl_launch_dependents, pdl_wait


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
    if _checks.value_checks_enabled() and not _checks.already_validated("kv", (slot_mapping,), (num_slots,)):
        bad = (slot_mapping < -1) | (slot_mapping >= num_slots)
        _checks.raise_if(
            bad.any(),
            lambda: "slot_mapping must hold -1 or a slot in [0, num_blocks * block_size = "
            f"{num_slots}), got {slot_mapping[bad][:8].tolist()}",
        )
        _checks.remember_validated("kv", (slot_mapping,), (num_slots,))
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping, num_slots,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_H=triton.next_power_of_2(num_kv_heads),
        BLOCK_D=triton.next_power_of_2(head_dim), PAGE=page, num_warps=4, **pdl_launch(pdl_enabled(key.device)),
    )
