"""Builders of paged K/V inputs for the kernel tests.

Every cache slot that holds no token is NaN and every block-table entry past a sequence's context is
garbage, so a kernel that reads outside the context shows up as NaN or as a crash.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# (atol, rtol) against the fp32-computing references.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    # Drawn on the CPU so a seed gives the same numbers on every device.
    return torch.randn(*shape, generator=gen).to(device=DEVICE, dtype=dtype)


def rotary_tables(max_position: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos``/``sin [max_position, half]`` fp32 tables of the rotary embedding (base 10000)."""
    inv = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float64) / half))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float64), inv)
    return freqs.cos().float().to(DEVICE), freqs.sin().float().to(DEVICE)


@dataclass
class PagedKV:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    block_tables: torch.Tensor
    context_lens: torch.Tensor
    keys: list[torch.Tensor]  # per sequence, [context_len, num_kv_heads, head_dim] (contiguous copies)
    values: list[torch.Tensor]


def make_paged_kv(
    gen: torch.Generator,
    context_lens: list[int],
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    spare_blocks: int = 3,
) -> PagedKV:
    """Scatter random per-sequence K/V over a shuffled set of blocks of a NaN-filled cache."""
    needed = [math.ceil(n / block_size) for n in context_lens]
    num_blocks = sum(needed) + spare_blocks
    width = max(needed + [1]) + 1  # one column more than any sequence needs: always garbage
    order = torch.randperm(num_blocks, generator=gen).tolist()
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    v_cache = torch.full(shape, float("nan"), dtype=dtype, device=DEVICE)
    # Garbage past each context: -1 padding and ids past the end of the cache alternate.
    table = torch.tensor([[-1, num_blocks + 7][j % 2] for j in range(width)] * len(context_lens))
    table = table.view(len(context_lens), width).to(torch.int32)
    keys, values = [], []
    for b, (length, count) in enumerate(zip(context_lens, needed, strict=True)):
        blocks = [order.pop() for _ in range(count)]
        table[b, :count] = torch.tensor(blocks, dtype=torch.int32)
        k = randn(gen, length, num_kv_heads, head_dim, dtype=dtype)
        v = randn(gen, length, num_kv_heads, head_dim, dtype=dtype)
        for t in range(0, length, block_size):
            chunk = slice(t, min(t + block_size, length))
            k_cache[blocks[t // block_size], : chunk.stop - t] = k[chunk]
            v_cache[blocks[t // block_size], : chunk.stop - t] = v[chunk]
        keys.append(k)
        values.append(v)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=DEVICE)
    return PagedKV(k_cache, v_cache, table.to(DEVICE), lens, keys, values)


def nan_like(t: torch.Tensor) -> torch.Tensor:
    """A preallocated output poisoned with NaN, so an element the kernel never writes fails the test."""
    return torch.full_like(t, float("nan"))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(actual.float(), expected.float(), atol=atol, rtol=rtol)


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    """A matmul-like output (``got`` in ``dtype``) against its fp32 reference: sums of K products of unit
    normals (|y| ~ sqrt(K)), so the absolute tolerance scales with them."""
    atol, rtol = TOLERANCES[dtype]
    assert got.dtype == dtype and torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want, atol=atol * want.abs().max().item(), rtol=rtol)
