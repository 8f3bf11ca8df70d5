"""Triton KV-cache write against ``reference.write_kv_cache``."""

from __future__ import annotations

import pytest
import torch
from leanserve.kernels import kv_cache, reference

from tests.kernels.kernel_cases import DEVICE, generator, randn


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
