"""Triton variable-length causal paged prefill against ``reference.paged_prefill_attention``."""

from __future__ import annotations

import pytest
import torch
from leanserve.kernels import paged_attention, reference

from tests.kernels.kernel_cases import DEVICE, assert_close, generator, make_paged_kv, nan_like, randn

# (seed, context_lens, chunk lengths, heads, kv_heads, head_dim, block_size, dtype)
CASES = [
    (20, [70], [70], 4, 4, 64, 16, torch.float32),  # fresh prompt, one sequence
    (21, [150], [40], 8, 2, 128, 16, torch.float32),  # chunk after a cached prefix, GQA 4
    (22, [1, 9, 80, 64, 30], [1, 0, 17, 64, 5], 6, 2, 64, 8, torch.float16),  # many, GQA 3, empty chunk
    (23, [33, 130], [33, 66], 3, 1, 40, 5, torch.float32),  # head_dim 40, odd block size, 2 tiles
    (27, [100], [70], 2, 1, 256, 16, torch.float32),  # head_dim 256: the halved key tile
]
IDS = ["fresh", "prefix-gqa4-d128", "many-gqa3-fp16", "d40-bs5", "d256"]


def _inputs(case):
    seed, lens, q_lens, heads, kv_heads, head_dim, block_size, dtype = case
    gen = generator(seed)
    kv = make_paged_kv(gen, lens, kv_heads, head_dim, block_size, dtype)
    query = randn(gen, sum(q_lens), heads, head_dim, dtype=dtype)
    cu = torch.tensor([0] + q_lens, device=DEVICE).cumsum(0).to(torch.int32)
    return [query, kv.k_cache, kv.v_cache, kv.block_tables, cu, kv.context_lens, head_dim**-0.5]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prefill_matches_reference(case):
    args = _inputs(case)
    out = paged_attention.paged_prefill_attention(*args, out=nan_like(args[0]))
    assert_close(out, reference.paged_prefill_attention(*args), case[-1])


def test_int64_offsets_and_strided_query():
    case = (24, [90, 20], [50, 20], 8, 2, 64, 16, torch.float32)
    args = _inputs(case)
    qkv = torch.cat([args[0].flatten(1), torch.zeros(70, 4 * 64, device=DEVICE)], dim=1)
    args[0] = qkv[:, : 8 * 64].view(70, 8, 64)  # a view into a fused QKV output
    args[4] = args[4].long()
    out = paged_attention.paged_prefill_attention(*args)
    assert_close(out, reference.paged_prefill_attention(*args), torch.float32)


def test_batch_invariance():
    args = _inputs(CASES[2])
    query, k_cache, v_cache, tables, cu, lens, scale = args
    batch = paged_attention.paged_prefill_attention(*args)
    for b in range(len(lens)):
        start, end = int(cu[b]), int(cu[b + 1])
        alone = paged_attention.paged_prefill_attention(
            query[start:end], k_cache, v_cache, tables[b : b + 1],
            torch.tensor([0, end - start], dtype=torch.int32, device=DEVICE), lens[b : b + 1], scale,
        )
        assert torch.equal(alone, batch[start:end])


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: a.__setitem__(5, a[5] - 10), "no chunk longer than its context"),
        (lambda a: a.__setitem__(4, a[4][:-1]), "num_seqs \\+ 1"),
        (lambda a: a[4].__setitem__(-1, 3), "end at num_tokens"),
        (lambda a: a[3].__setitem__((0, 0), 10**6), "block ids outside"),
        (lambda a: a.__setitem__(4, a[4].float()), "cu_seqlens_q must be"),
    ],
    ids=["chunk-longer-than-ctx", "cu-length", "cu-end", "block-past-end", "cu-dtype"],
)
def test_launcher_rejects_bad_inputs(mutate, message):
    args = _inputs((25, [40, 20], [10, 20], 4, 2, 64, 16, torch.float32))
    mutate(args)
    with pytest.raises(ValueError, match=message):
        paged_attention.paged_prefill_attention(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_prefill_large_gpu(dtype):
    gen = generator(26)
    q_lens = torch.randint(1, 1024, (8,), generator=gen).tolist()
    prefixes = torch.randint(0, 2048, (8,), generator=gen).tolist()
    lens = [q + p for q, p in zip(q_lens, prefixes, strict=True)]
    args = _inputs((26, lens, q_lens, 32, 8, 128, 16, dtype))
    out = paged_attention.paged_prefill_attention(*args, out=nan_like(args[0]))
    assert_close(out, reference.paged_prefill_attention(*args), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_prefill_bf16_gpu(case):
    args = _inputs(case[:-1] + (torch.bfloat16,))
    out = paged_attention.paged_prefill_attention(*args, out=nan_like(args[0]))
    assert_close(out, reference.paged_prefill_attention(*args), torch.bfloat16)
