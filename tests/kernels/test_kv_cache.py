"""Triton KV-cache write against ``reference.write_kv_cache``."""

from __future__ import annotations

import pytest
import torch
from leanserve.kernels import kv_cache, reference

from tests.kernels.kernel_cases import DEVICE, generator, randn, rotary_tables


def _inputs(seed, num_tokens, kv_heads, head_dim, num_blocks, block_size, src_dtype, cache_dtype):
    gen = generator(seed)
    key = randn(gen, num_tokens, kv_heads, head_dim, dtype=src_dtype)
    value = randn(gen, num_tokens, kv_heads, head_dim, dtype=src_dtype)
    # Distinct slots, with about a quarter of the tokens marked as padding.
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[torch.rand(num_tokens, generator=gen) < 0.25] = -1
    shape = (num_blocks, block_size, kv_heads, head_dim)
    k_cache = randn(gen, *shape, dtype=cache_dtype)
    v_cache = randn(gen, *shape, dtype=cache_dtype)
    return key, value, k_cache, v_cache, slots.to(DEVICE)


@pytest.mark.parametrize(
    "seed,num_tokens,kv_heads,head_dim,block_size,src_dtype,cache_dtype",
    [
        (30, 1, 1, 64, 16, torch.float32, torch.float32),
        (31, 37, 2, 128, 16, torch.float16, torch.float16),
        (32, 20, 3, 80, 5, torch.float32, torch.float32),  # non-power-of-two heads, head_dim, block size
        (33, 24, 8, 64, 16, torch.float32, torch.float16),  # converted to the cache dtype
    ],
)
def test_write_matches_reference_and_skips_padding(
    seed, num_tokens, kv_heads, head_dim, block_size, src_dtype, cache_dtype
):
    key, value, k_cache, v_cache, slots = _inputs(
        seed, num_tokens, kv_heads, head_dim, 6, block_size, src_dtype, cache_dtype
    )
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    before = k_cache.clone()
    kv_cache.write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    # Every slot not named by a valid token keeps its old contents.
    written = torch.zeros(k_cache.shape[0] * block_size, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    assert torch.equal(k_cache.flatten(0, 1)[~written], before.flatten(0, 1)[~written])


def test_strided_key_and_value_views():
    # key/value as views into a fused QKV projection output [T, (H + 2 * KVH) * D].
    gen = generator(34)
    qkv = randn(gen, 9, (4 + 2 * 2) * 32)
    key = qkv[:, 4 * 32 : 6 * 32].view(9, 2, 32)
    value = qkv[:, 6 * 32 :].view(9, 2, 32)
    _, _, k_cache, v_cache, slots = _inputs(35, 9, 2, 32, 4, 8, torch.float32, torch.float32)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    kv_cache.write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: a[4].__setitem__(0, 6 * 16), "slot_mapping must hold -1 or a slot"),
        (lambda a: a[4].__setitem__(0, -2), "slot_mapping must hold -1 or a slot"),
        (lambda a: a.__setitem__(4, a[4].int()), "slot_mapping must be torch.int64"),
        (lambda a: a.__setitem__(0, a[0][:, :1]), "key must be"),
        (lambda a: a.__setitem__(1, a[1].long()), "float16, bfloat16 or float32"),
        (lambda a: a.__setitem__(3, a[3].half()), "must match"),
    ],
    ids=["slot-past-end", "slot-minus-2", "int32-slots", "key-shape", "int-value", "cache-dtypes"],
)
def test_launcher_rejects_bad_inputs(mutate, message):
    args = list(_inputs(36, 8, 2, 64, 6, 16, torch.float32, torch.float32))
    mutate(args)
    with pytest.raises(ValueError, match=message):
        kv_cache.write_kv_cache(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("src_dtype", [torch.bfloat16, torch.float32])
def test_write_bf16_cache_gpu(src_dtype):
    key, value, k_cache, v_cache, slots = _inputs(37, 300, 8, 128, 64, 16, src_dtype, torch.bfloat16)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    reference.write_kv_cache(key, value, k_ref, v_ref, slots)
    kv_cache.write_kv_cache(key, value, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize(
    "seed,tokens,heads,kv_heads,head_dim,block_size,src_dtype,cache_dtype",
    [
        (40, 1, 9, 3, 64, 16, torch.float32, torch.float32),  # the embedded model's heads, one decode
        (41, 13, 8, 2, 128, 16, torch.float16, torch.float16),
        (42, 7, 4, 4, 80, 5, torch.float32, torch.float16),  # head_dim / 2 not a power of two; cache cast
    ],
)
def test_rotary_write_equals_rotary_then_write(seed, tokens, heads, kv_heads, head_dim, block_size, src_dtype,
                                              cache_dtype):
    """One launch does what ``apply_rotary`` then ``write_kv_cache`` do, bit for bit in the cache and to
    the tolerance of the rotation in q and k: q and k rotated in place as views of a fused QKV output
    (V untouched there), padding tokens rotated but not written."""
    gen = generator(seed)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = randn(gen, tokens, q_size + 2 * kv_size, dtype=src_dtype)
    positions = torch.randint(0, 300, (tokens,), generator=gen).to(DEVICE)
    cos, sin = rotary_tables(300, head_dim // 2)
    _, _, k_cache, v_cache, slots = _inputs(seed, tokens, kv_heads, head_dim, 6, block_size, src_dtype, cache_dtype)

    def views(buffer):
        q, k, v = buffer.split([q_size, kv_size, kv_size], dim=-1)
        return q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim), v.view(tokens, kv_heads, head_dim)

    ref_buffer, k_ref, v_ref = qkv.clone(), k_cache.clone(), v_cache.clone()
    want_q, want_k = reference.write_kv_cache_rotary(*views(ref_buffer), positions, cos, sin, k_ref, v_ref, slots)
    before = qkv.clone()
    q, k, v = views(qkv)
    got_q, got_k = kv_cache.write_kv_cache_rotary(q, k, v, positions, cos, sin, k_cache, v_cache, slots)
    atol, rtol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}[src_dtype]
    torch.testing.assert_close(got_q, want_q, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_k, want_k, atol=atol, rtol=rtol)
    assert got_q.data_ptr() == q.data_ptr() and got_k.data_ptr() == k.data_ptr()  # in place
    assert torch.equal(qkv[:, q_size + kv_size :], before[:, q_size + kv_size :])
    # The cache holds the rotated keys the kernel kept (what write_kv_cache of them would store).
    k_expect = k_ref.clone()
    valid = slots >= 0
    flat = (-1, kv_heads, head_dim)
    k_expect.view(flat)[slots[valid]] = got_k[valid].to(cache_dtype)
    assert torch.equal(k_cache, k_expect) and torch.equal(v_cache, v_ref)
    torch.testing.assert_close(k_cache.float(), k_ref.float(), atol=2 * atol, rtol=2 * rtol)


def test_rotary_write_rejects_bad_slots_and_positions():
    key, value, k_cache, v_cache, slots = _inputs(43, 4, 2, 64, 6, 16, torch.float32, torch.float32)
    query = torch.zeros(4, 4, 64, device=DEVICE)
    cos, sin = rotary_tables(32, 32)
    positions = torch.tensor([0, 1, 2, 3], device=DEVICE)
    bad_slots = slots.clone()
    bad_slots[0] = 6 * 16
    with pytest.raises(ValueError, match="slot_mapping must hold -1 or a slot"):
        kv_cache.write_kv_cache_rotary(query, key, value, positions, cos, sin, k_cache, v_cache, bad_slots)
    with pytest.raises(ValueError, match="positions must lie"):
        kv_cache.write_kv_cache_rotary(query, key, value, positions + 29, cos, sin, k_cache, v_cache, slots)


@pytest.mark.gpu
def test_rotary_write_bf16_gpu():
    """bf16 (the interpreter computes it wrongly, so only compiled): Llama-8B heads, 300 tokens."""
    tokens, heads, kv_heads, head_dim = 300, 32, 8, 128
    gen = generator(44)
    q = randn(gen, tokens, heads, head_dim, dtype=torch.bfloat16)
    key, value, k_cache, v_cache, slots = _inputs(44, tokens, kv_heads, head_dim, 64, 16, torch.bfloat16,
                                                  torch.bfloat16)
    positions = torch.randint(0, 4096, (tokens,), generator=gen).to(DEVICE)
    cos, sin = rotary_tables(4096, head_dim // 2)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    want_q, want_k = reference.write_kv_cache_rotary(q.clone(), key.clone(), value, positions, cos, sin, k_ref, v_ref,
                                                     slots)
    got_q, got_k = kv_cache.write_kv_cache_rotary(q, key, value, positions, cos, sin, k_cache, v_cache, slots)
    torch.testing.assert_close(got_q, want_q, atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(got_k, want_k, atol=1.6e-2, rtol=1.6e-2)
    torch.testing.assert_close(k_cache, k_ref, atol=1.6e-2, rtol=1.6e-2)
    assert torch.equal(v_cache, v_ref)
