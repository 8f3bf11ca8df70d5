"""Attention over the paged KV cache, behind one interface for every device.

The runner describes each step with an ``AttentionMetadata``: the step's tokens are laid out with all
single-token decodes first (batched into one paged-decode call) and then the prefill chunks back to
back (one variable-length paged-prefill call). The backend rotates the step's queries and keys and writes
its K/V into the cache, then attends. On CUDA the ops are Triton kernels; elsewhere the plain-torch references.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanserve.kernels.backend import AttentionOps


@dataclass
class DecodeGroup:
    """Decodes ``start:end`` of the step and the mask of their real positions ``[n, 1, 1, blocks *
    block_size]``. ``blocks``: their block ids flattened, read by one index_select per layer into reused
    gather destinations ``buffers`` (a fresh multi-MB tensor per layer costs 4x the copy itself in page
    faults); or, when the ids are one consecutive run (a lone sequence, see
    ``BlockManager._take_free_block``), a slice of the cache, read as a view with no gather and no
    buffers (INT4 embedded model at batch 1: 9.95 against 10.58 ms a step)."""

    start: int
    end: int
    blocks: torch.Tensor | slice
    mask: torch.Tensor
    buffers: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64
    num_decode_tokens: int
    decode_block_tables: torch.Tensor  # [num_decodes, max_blocks] int32
    decode_context_lens: torch.Tensor  # [num_decodes] int32
    decode_max_context_len: int
    prefill_block_tables: torch.Tensor  # [num_prefills, max_blocks] int32
    prefill_cu_seqlens_q: torch.Tensor  # [num_prefills + 1] int32
    prefill_context_lens: torch.Tensor  # [num_prefills] int32
    # True when no prefill chunk has cached context before it: attention needs only the chunk itself.
    prefill_is_fresh: bool
    # CPU decode path: the decodes, sorted by context length, in groups of similar length (padding
    # every decode to the longest context in the batch wasted most of the attention work).
    decode_groups: list[DecodeGroup] | None = None


class PagedAttention:
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, ops: AttentionOps) -> None:
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.ops = ops

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        rotary: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """``query [T, H, D]``, ``key``/``value [T, KVH, D]`` -> ``[T, H, D]``. Query and key are first
        rotated by ``rotary``, the ``(positions, cos, sin)`` of ``reference.apply_rotary``, in the same op
        (one launch on CUDA) that writes the keys and values into the cache."""
        query, key = self.ops.write_kv_cache_rotary(query, key, value, *rotary, k_cache, v_cache, meta.slot_mapping)
        n_dec = meta.num_decode_tokens
        if n_dec == query.shape[0]:
            return self.decode(query, k_cache, v_cache, meta)
        out = torch.empty_like(query)
        if n_dec:
            out[:n_dec] = self.decode(query[:n_dec], k_cache, v_cache, meta)
        if meta.prefill_is_fresh and query.device.type == "cpu":
            # No cached prefix: attend to the chunk's own K/V and skip gathering it back from the cache.
            out[n_dec:] = self._fresh_prefill(query[n_dec:], key[n_dec:], value[n_dec:], meta)
        else:
            out[n_dec:] = self.ops.paged_prefill_attention(
                query[n_dec:], k_cache, v_cache, meta.prefill_block_tables,
                meta.prefill_cu_seqlens_q, meta.prefill_context_lens, self.scale,
            )
        return out

    def decode(
        self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """Attention of the step's decodes, ``query [num_decodes, H, D]``, whose K/V are already in the
        cache."""
        if meta.decode_groups is None:
            return self.ops.paged_decode_attention(
                query, k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                self.scale, meta.decode_max_context_len,
            )
        # CPU: whole blocks via index_select (3x faster than token-level advanced indexing), then
        # SDPA with a mask over the positions past each context. Cache slots are always finite
        # (zero-initialised, then overwritten), so masked positions contribute exactly zero.
        gqa = self.num_heads != self.num_kv_heads
        groups = meta.decode_groups
        out = torch.empty_like(query) if len(groups) > 1 else None  # one group: its result is the output
        for group in groups:
            shape = (group.end - group.start, -1, self.num_kv_heads, self.head_dim)
            if isinstance(group.blocks, slice):
                keys, values = k_cache[group.blocks].view(shape), v_cache[group.blocks].view(shape)
            else:
                assert group.buffers is not None
                keys = torch.index_select(k_cache, 0, group.blocks, out=group.buffers[0]).view(shape)
                values = torch.index_select(v_cache, 0, group.blocks, out=group.buffers[1]).view(shape)
            attn = torch.nn.functional.scaled_dot_product_attention(
                query[group.start : group.end].unsqueeze(2),
                keys.transpose(1, 2),
                values.transpose(1, 2),
                attn_mask=group.mask,
                scale=self.scale,
                enable_gqa=gqa,
            ).squeeze(2)
            if out is None:
                return attn
            out[group.start : group.end] = attn
        assert out is not None
        return out

    def _fresh_prefill(
        self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        out = torch.empty_like(query)
        bounds = meta.prefill_cu_seqlens_q.tolist()
        gqa = self.num_heads != self.num_kv_heads
        for start, end in zip(bounds[:-1], bounds[1:], strict=False):
            q = query[start:end].transpose(0, 1).unsqueeze(0)
            k = key[start:end].transpose(0, 1).unsqueeze(0)
            v = value[start:end].transpose(0, 1).unsqueeze(0)
            attn = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=True, scale=self.scale, enable_gqa=gqa
            )
            out[start:end] = attn[0].transpose(0, 1)
        return out
