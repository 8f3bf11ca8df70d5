"""The plain-torch references agree with PyTorch SDPA on contiguous, un-paged K/V (fp32, 1e-5)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from leanserve.kernels import reference

from tests.kernels.kernel_cases import DEVICE, generator, make_paged_kv, randn

ATOL = RTOL = 1e-5


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool) -> torch.Tensor:
    """``q [Q, H, D]``, ``k``/``v [L, KVH, D]`` -> ``[Q, H, D]``, GQA by repeating the KV heads."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
        is_causal=causal, scale=scale,
    )
    return out[0].transpose(0, 1)


@pytest.mark.parametrize(
    "seed,lens,heads,kv_heads,head_dim,block_size",
    [
        (0, [1], 4, 4, 64, 16),
        (1, [37, 5, 130], 8, 2, 64, 16),
        (2, [64, 17], 6, 2, 128, 8),
    ],
)
def test_decode_reference_matches_sdpa(seed, lens, heads, kv_heads, head_dim, block_size):
    gen = generator(seed)
    kv = make_paged_kv(gen, lens, kv_heads, head_dim, block_size, torch.float32)
    query = randn(gen, len(lens), heads, head_dim)
    scale = head_dim**-0.5
    out = reference.paged_decode_attention(
        query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale
    )
    for b in range(len(lens)):
        # The newest token sees the whole context: no mask.
        expected = _sdpa(query[b : b + 1], kv.keys[b], kv.values[b], scale, causal=False)[0]
        torch.testing.assert_close(out[b], expected, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize(
    "seed,lens,q_lens,heads,kv_heads,head_dim",
    [
        (3, [40], [40], 4, 4, 64),  # fresh prompt
        (4, [100, 9, 33], [30, 9, 1], 8, 2, 64),  # chunks after a cached prefix
        (5, [50, 20], [0, 20], 6, 2, 128),  # an empty chunk
    ],
)
def test_prefill_reference_matches_causal_sdpa(seed, lens, q_lens, heads, kv_heads, head_dim):
    gen = generator(seed)
    kv = make_paged_kv(gen, lens, kv_heads, head_dim, 16, torch.float32)
    scale = head_dim**-0.5
    # Full-sequence queries: causal SDPA over the whole sequence, whose last q_len rows are the chunk.
    full_q = [randn(gen, n, heads, head_dim) for n in lens]
    query = torch.cat([q[n - q_n :] for q, n, q_n in zip(full_q, lens, q_lens, strict=True)])
    cu = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    out = reference.paged_prefill_attention(
        query, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, scale
    )
    for b, (n, q_n) in enumerate(zip(lens, q_lens, strict=True)):
        expected = _sdpa(full_q[b], kv.keys[b], kv.values[b], scale, causal=True)[n - q_n :]
        torch.testing.assert_close(out[cu[b] : cu[b + 1]], expected, atol=ATOL, rtol=RTOL)


def test_prefill_of_one_token_equals_decode():
    gen = generator(6)
    kv = make_paged_kv(gen, [23, 70], 2, 64, 16, torch.float32)
    query = randn(gen, 2, 4, 64)
    cu = torch.tensor([0, 1, 2], dtype=torch.int32, device=DEVICE)
    args = (kv.k_cache, kv.v_cache, kv.block_tables)
    decode = reference.paged_decode_attention(query, *args, kv.context_lens, 0.125)
    prefill = reference.paged_prefill_attention(query, *args, cu, kv.context_lens, 0.125)
    torch.testing.assert_close(decode, prefill, atol=ATOL, rtol=RTOL)


def test_decode_ignores_garbage_past_the_context_and_zeroes_empty_sequences():
    # make_paged_kv leaves NaN in unwritten slots and out-of-range ids in unused table entries.
    gen = generator(7)
    kv = make_paged_kv(gen, [3, 0, 40], 2, 64, 16, torch.float32)
    query = randn(gen, 3, 2, 64)
    out = reference.paged_decode_attention(
        query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125
    )
    assert torch.isfinite(out).all()
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_write_kv_cache_reference_skips_padding_slots():
    gen = generator(8)
    k_cache, v_cache = randn(gen, 4, 8, 2, 16), randn(gen, 4, 8, 2, 16)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    key, value = randn(gen, 3, 2, 16), randn(gen, 3, 2, 16)
    slots = torch.tensor([5, -1, 30], device=DEVICE)
    reference.write_kv_cache(key, value, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(32, 2, 16), v_cache.view(32, 2, 16)
    assert torch.equal(flat_k[5], key[0]) and torch.equal(flat_v[30], value[2])
    untouched = [s for s in range(32) if s not in (5, 30)]
    assert torch.equal(flat_k[untouched], before_k.view(32, 2, 16)[untouched])
    assert torch.equal(flat_v[untouched], before_v.view(32, 2, 16)[untouched])
