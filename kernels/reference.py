"""Plain-torch references for the paged-attention kernels.

These are the semantics every backend must reproduce, and the attention path the CPU runner uses.
Layouts (shared with the Triton kernels in this folder):

- ``k_cache``/``v_cache``: ``[num_blocks, block_size, num_kv_heads, head_dim]``, one pair per layer.
- ``block_tables``: ``[num_seqs, max_blocks_per_seq]`` int32; entry ``j`` of row ``b`` is the physical
  block holding tokens ``j*block_size .. (j+1)*block_size-1`` of sequence ``b``. Unused entries may
  hold anything (they are never read past ``context_lens``).
- ``context_lens``: ``[num_seqs]`` int32, the number of tokens of each sequence whose K/V are in the
  cache, *including* the tokens of the current step (their K/V are written before attention runs).
- ``slot_mapping``: ``[num_tokens]`` int64, the flat slot ``block * block_size + offset`` of each new
  token; ``-1`` marks a padding token whose K/V must not be written.
"""

from __future__ import annotations

import torch


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    padded: bool = True,
) -> None:
    """Scatter ``key``/``value`` ``[num_tokens, num_kv_heads, head_dim]`` into their cache slots.

    ``padded=False``: the caller knows no slot is -1, and the check for them (a host sync) is skipped.
    """
    num_blocks, block_size, num_kv_heads, head_dim = k_cache.shape
    valid = slot_mapping >= 0 if padded else None
    if valid is not None and not bool(valid.all()):
        key, value, slot_mapping = key[valid], value[valid], slot_mapping[valid]
    flat_k = k_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    flat_v = v_cache.view(num_blocks * block_size, num_kv_heads, head_dim)
    # (Converted only when needed: a no-op .to() still costs a dispatch, per layer of a CPU step.)
    if key.dtype != k_cache.dtype:
        key = key.to(k_cache.dtype)
    if value.dtype != v_cache.dtype:
        value = value.to(v_cache.dtype)
    flat_k.index_copy_(0, slot_mapping, key)
    flat_v.index_copy_(0, slot_mapping, value)


def gather_kv(
    cache: torch.Tensor, block_tables: torch.Tensor, max_context_len: int
) -> torch.Tensor:
    """Read ``[num_seqs, max_context_len, num_kv_heads, head_dim]`` from the cache via the block table."""
    block_size = cache.shape[1]
    num_blocks_needed = (max_context_len + block_size - 1) // block_size
    # Entries past a sequence's own context may hold anything (e.g. -1 padding, stale ids): clamp so
    # they index a real block; whatever they read is masked out by the callers.
    tables = block_tables[:, :num_blocks_needed].long().clamp_(0, cache.shape[0] - 1)
    gathered = cache[tables]  # [num_seqs, blocks, block_size, kv_heads, head_dim]
    num_seqs = tables.shape[0]
    return gathered.reshape(num_seqs, num_blocks_needed * block_size, *cache.shape[2:])[
        :, :max_context_len
    ]


def paged_decode_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    max_context_len: int | None = None,
) -> torch.Tensor:
    """One query token per sequence: ``query [num_seqs, num_heads, head_dim]`` -> same shape.

    Grouped-query attention: query head ``h`` reads KV head ``h // (num_heads // num_kv_heads)``.
    A sequence with ``context_lens == 0`` gets zeros.
    """
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    if max_context_len is None:
        max_context_len = int(context_lens.max())
    keys = gather_kv(k_cache, block_tables, max_context_len)  # [S, L, KVH, D]
    values = gather_kv(v_cache, block_tables, max_context_len)
    compute_dtype = torch.float32 if query.dtype != torch.float64 else torch.float64
    # [S, KVH, G, D] @ [S, KVH, D, L] -> [S, KVH, G, L]; no repeat of K/V for the groups.
    q = query.view(num_seqs, num_kv_heads, group, head_dim).to(compute_dtype)
    k = keys.permute(0, 2, 3, 1).to(compute_dtype)
    scores = torch.matmul(q, k) * scale
    positions = torch.arange(max_context_len, device=query.device)
    padding = positions[None, :] >= context_lens[:, None].to(positions.dtype)  # [S, L]
    scores.masked_fill_(padding[:, None, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    # A sequence with no context attends to nothing: zeros, not the NaN of an all -inf softmax.
    probs.masked_fill_((context_lens == 0)[:, None, None, None], 0.0)
    # Slots past a context (unwritten cache memory) may hold NaN/inf, and 0 * NaN = NaN: zero them.
    values = values.masked_fill(padding[:, :, None, None], 0.0)
    v = values.permute(0, 2, 1, 3).to(compute_dtype)  # [S, KVH, L, D]
    out = torch.matmul(probs, v)  # [S, KVH, G, D]
    return out.reshape(num_seqs, num_heads, head_dim).to(query.dtype)


def paged_prefill_attention(
    query: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Causal attention for a chunk of new tokens per sequence, variable lengths in one call.

    ``query [total_new_tokens, num_heads, head_dim]`` holds the sequences' chunks back to back;
    ``cu_seqlens_q [num_seqs + 1]`` their offsets. The chunk of sequence ``b`` occupies positions
    ``context_lens[b] - q_len_b .. context_lens[b] - 1``; each of its tokens attends to every cached
    key at or before its own position (the cached prefix plus the chunk, causally).
    """
    num_heads, _head_dim = query.shape[1], query.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(query)
    starts = cu_seqlens_q.tolist()
    lens = context_lens.tolist()
    compute_dtype = torch.float32 if query.dtype != torch.float64 else torch.float64
    for b in range(len(lens)):
        q_start, q_end, ctx = starts[b], starts[b + 1], lens[b]
        q_len = q_end - q_start
        if q_len == 0:
            continue
        keys = gather_kv(k_cache, block_tables[b : b + 1], ctx)[0]  # [L, KVH, D]
        values = gather_kv(v_cache, block_tables[b : b + 1], ctx)[0]
        q = query[q_start:q_end].transpose(0, 1).to(compute_dtype)  # [H, Q, D]
        k = keys.transpose(0, 1).to(compute_dtype)  # [KVH, L, D]
        v = values.transpose(0, 1).to(compute_dtype)
        q_positions = torch.arange(ctx - q_len, ctx, device=query.device)
        k_positions = torch.arange(ctx, device=query.device)
        allowed = k_positions[None, :] <= q_positions[:, None]  # [Q, L]
        attn = torch.nn.functional.scaled_dot_product_attention(
            q.unsqueeze(0),
            k.unsqueeze(0),
            v.unsqueeze(0),
            attn_mask=allowed,
            scale=scale,
            enable_gqa=group > 1,
        )[0]
        out[q_start:q_end] = attn.transpose(0, 1).to(query.dtype)
    return out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x [T, hidden]``; with ``residual``, of ``x + residual``, returning the sum as well
    (the decoder layer's next residual). The sum is rounded to ``x.dtype`` before it is normalised,
    as an unfused ``residual + x`` followed by the norm would be."""
    if residual is None:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, eps)
    total = x + residual
    return torch.nn.functional.rms_norm(total, (x.shape[-1],), weight, eps), total


def apply_rotary(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotary embedding in the "rotate half" layout: ``query [T, H, D]``, ``key [T, KVH, D]`` rotated by
    their token ``positions [T]``; ``cos``/``sin [max_position, D // 2]`` fp32. Computed in fp32."""
    both = rotate(torch.cat((query, key), dim=1), rotary_factors(positions, cos, sin))
    q, k = both.split((query.shape[1], key.shape[1]), dim=1)
    return q, k


def rotary_factors(
    positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's ``(c, c)`` and ``(-s, s)`` rows for ``rotate``, ``[T, 1, D]`` fp32 each. The same for
    every layer of a step, so a caller may build them once."""
    c, s = cos[positions], sin[positions]
    factors = torch.cat((c, c, -s, s), dim=-1).view(-1, 2, 1, 2 * c.shape[-1])
    return factors[:, 0], factors[:, 1]


def rotate(heads: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Rotate ``heads [T, N, D]`` (queries and keys alike) by ``rotary_factors``; fp32 inside, the
    input's dtype out."""
    # ``x * (c, c) + roll(x, D/2) * (-s, s)``: a handful of ops instead of ~20 for the two halves written
    # out, with the same roundings; a CPU decode step pays per op (28 -> 18 us per layer for the embedded
    # model on the 2-core host).
    x = heads if heads.dtype == torch.float32 else heads.float()
    out = x * factors[0] + x.roll(x.shape[-1] // 2, -1) * factors[1]
    return out if heads.dtype == torch.float32 else out.to(heads.dtype)


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
    """A decoder's step before attention: ``apply_rotary`` to ``query``/``key``, then ``write_kv_cache``
    of the rotated keys and ``value``; returns the rotated ``(query, key)``."""
    query, key = apply_rotary(query, key, positions, cos, sin)
    write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    return query, key


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation: ``x [..., 2 * I]`` holds gate then up; returns ``silu(gate) * up``."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


# A linear layer, ``x [..., K] @ weight [N, K]^T (+ bias)``: what the Triton GEMV (``gemv.linear``) must
# reproduce. An alias, not a wrapper: the CPU model calls it for every unpacked linear.
linear = torch.nn.functional.linear


# The decode fusions a decoder layer calls for small batches (``gemv.norm_linear`` & co. on CUDA): each
# is the sequence of ops the layer's ordinary path runs, so on any device the two paths agree bit for bit.


def norm_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(rms_norm(x, norm_weight, eps), weight, bias)``."""
    return linear(rms_norm(x, norm_weight, eps), weight, bias)


def norm_gated_linear(x: torch.Tensor, norm_weight: torch.Tensor, eps: float, weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> torch.Tensor:
    """``silu_and_mul(linear(rms_norm(x, norm_weight, eps), weight, bias))``: ``weight`` stacks gate and up."""
    return silu_and_mul(linear(rms_norm(x, norm_weight, eps), weight, bias))


def linear_residual(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                    residual: torch.Tensor) -> torch.Tensor:
    """``residual + linear(x, weight, bias)`` (a new tensor; the CUDA form writes into ``residual``)."""
    return linear(x, weight, bias) + residual
