from __future__ import annotations

import pytest

from leanserve.engine.block_manager import BlockManager
from leanserve.engine.sequence import Sequence
from leanserve.sampling_params import SamplingParams


def seq(tokens: list[int], rid: str = "r") -> Sequence:
    return Sequence(rid, tokens, SamplingParams())


def test_allocate_append_free_accounting() -> None:
    bm = BlockManager(num_blocks=4, block_size=4, enable_prefix_caching=False)
    s = seq(list(range(6)))
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 2 and bm.num_free_blocks == 2
    # Grow to 8 tokens: still inside the second block.
    s.token_ids += [6, 7]
    assert bm.can_append(s)
    bm.append_slot(s)
    assert len(s.block_table) == 2
    s.token_ids.append(8)  # the 9th token needs a third block
    bm.append_slot(s)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 1
    bm.free(s)
    assert bm.num_free_blocks == 4 and s.block_table == []


def test_can_allocate_refuses_without_side_effects() -> None:
    bm = BlockManager(num_blocks=2, block_size=4, enable_prefix_caching=False)
    big = seq(list(range(9)))
    assert not bm.can_allocate(big)
    assert bm.num_free_blocks == 2 and big.block_table == []
    assert not bm.can_allocate(seq([1, 2]), reserve=2)


def test_can_append_false_when_full() -> None:
    bm = BlockManager(num_blocks=1, block_size=2, enable_prefix_caching=False)
    s = seq([1, 2])
    bm.allocate(s)
    s.token_ids.append(3)
    assert not bm.can_append(s)


def test_prefix_cache_hit_shares_blocks_and_counts_tokens() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(10)), "a")
    bm.allocate(a)
    a.num_computed_tokens = 10
    bm.cache_full_blocks(a)  # blocks holding tokens 0..3 and 4..7 are now cached
    b = seq(list(range(9)) + [99], "b")
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]
    assert b.num_computed_tokens == 8 and b.num_cached_tokens == 8
    assert bm.blocks[a.block_table[0]].ref_count == 2
    assert bm.prefix_hits == 8 and bm.prefix_queries == 20


def test_prefix_cache_leaves_one_token_to_compute() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a = seq(list(range(8)), "a")
    bm.allocate(a)
    a.num_computed_tokens = 8
    bm.cache_full_blocks(a)
    b = seq(list(range(8)), "b")  # identical, block-aligned prompt
    bm.allocate(b)
    # The last block is recomputed so the model still produces logits for the last prompt token.
    assert b.num_computed_tokens == 4
    assert b.block_table[0] == a.block_table[0] and b.block_table[1] != a.block_table[1]


def test_freed_cached_blocks_are_reused_then_evicted_lru() -> None:
    bm = BlockManager(num_blocks=3, block_size=2)
    a = seq([1, 2, 3, 4], "a")
    bm.allocate(a)
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a)
    bm.free(a)
    assert bm.num_free_blocks == 3 and len(bm.cached) == 2
    # Same prefix again: a hit on a free cached block takes it back off the free list.
    b = seq([1, 2, 3, 4, 5], "b")
    assert bm.can_allocate(b)
    bm.allocate(b)
    assert b.num_cached_tokens == 4 and bm.num_free_blocks == 0
    bm.free(b)
    # A different prompt needing all blocks evicts the cached ones.
    c = seq([7, 8, 9, 10, 11, 12], "c")
    bm.allocate(c)
    assert bm.cached == {} and bm.num_free_blocks == 0


def test_hash_collision_is_caught_by_token_check() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3], "a")
    bm.allocate(a)
    a.num_computed_tokens = 3
    bm.cache_full_blocks(a)
    block = bm.blocks[a.block_table[0]]
    block.token_ids = (9, 9)  # pretend another prefix hashed the same
    b = seq([1, 2, 5], "b")
    bm.allocate(b)
    assert b.num_cached_tokens == 0


def test_prompt_logprob_requests_skip_prefix_cache() -> None:
    bm = BlockManager(num_blocks=4, block_size=2)
    a = seq([1, 2, 3], "a")
    bm.allocate(a)
    a.num_computed_tokens = 3
    bm.cache_full_blocks(a)
    b = Sequence("b", [1, 2, 3], SamplingParams(prompt_logprobs=1))
    bm.allocate(b)
    assert b.num_cached_tokens == 0


@pytest.mark.parametrize("prefer_following", [True, False])
def test_a_growing_sequence_takes_the_block_after_its_last_when_asked(prefer_following: bool) -> None:
    """Freed blocks return tail first, so taking the least recently freed hands the next sequence its
    blocks in descending order; with ``prefer_following`` (the CPU engine's setting) the block after the
    sequence's last is taken when free."""
    bm = BlockManager(num_blocks=6, block_size=4, prefer_following=prefer_following)
    a, b = seq(list(range(12)), "a"), seq(list(range(50, 62)), "b")
    bm.allocate(a)
    bm.allocate(b)
    assert (a.block_table, b.block_table) == ([0, 1, 2], [3, 4, 5])
    bm.free(a)
    bm.free(b)  # least recently freed first: 2, 1, 0, 5, 4, 3
    c = seq(list(range(100, 108)), "c")
    bm.allocate(c)
    assert c.block_table == ([2, 3] if prefer_following else [2, 1])
    c.token_ids += [200, 201, 202, 203, 204]
    bm.append_slot(c)
    assert c.block_table == ([2, 3, 4] if prefer_following else [2, 1, 0])
