"""Triton split-KV paged decode against ``reference.paged_decode_attention``."""

from __future__ import annotations

import itertools

import pytest
import torch
from leanserve.kernels import paged_attention, reference

from tests.kernels.kernel_cases import assert_close, generator, make_paged_kv, nan_like, randn

# (seed, context_lens, heads, kv_heads, head_dim, block_size, dtype)
CASES = [
    (10, [1], 4, 4, 64, 16, torch.float32),  # one sequence, one token, MHA
    (11, [300], 8, 2, 128, 16, torch.float32),  # long-ish single sequence, GQA 4, ragged last block
    (12, [7, 150, 33, 64, 1, 90, 12], 6, 2, 64, 8, torch.float16),  # many sequences, GQA 3
    (13, [45, 0, 19], 3, 1, 40, 5, torch.float32),  # head_dim 40 (padded to 64), odd block size, empty ctx
    (14, [129, 64], 8, 8, 128, 16, torch.float16),
    (19, [70], 2, 1, 256, 16, torch.float32),  # head_dim 256: the halved key tile
]
IDS = ["one-token", "gqa4-d128", "many-gqa3-fp16", "d40-bs5-empty", "mha-fp16", "d256"]


def _run(case, num_partitions):
    seed, lens, heads, kv_heads, head_dim, block_size, dtype = case
    gen = generator(seed)
    kv = make_paged_kv(gen, lens, kv_heads, head_dim, block_size, dtype)
    query = randn(gen, len(lens), heads, head_dim, dtype=dtype)
    scale = head_dim**-0.5
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, scale)
    out = paged_attention.paged_decode_attention(*args, num_partitions=num_partitions, out=nan_like(query))
    return out, reference.paged_decode_attention(*args), dtype


@pytest.fixture(autouse=True)
def poisoned_partials(monkeypatch):
    # Split-KV partials start as NaN too: a partition a kernel should have written and did not shows.
    monkeypatch.setattr(
        paged_attention, "_scratch", lambda shape, device: torch.full(shape, float("nan"), device=device)
    )


@pytest.mark.parametrize("num_partitions", [1, 3, None], ids=["no-split", "split3", "auto"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_decode_matches_reference(case, num_partitions):
    out, expected, dtype = _run(case, num_partitions)
    assert_close(out, expected, dtype)


def test_strided_query_and_max_context_len():
    # Query as a view into a fused QKV projection output; max_context_len given as by the runner.
    gen = generator(15)
    kv = make_paged_kv(gen, [70, 20], 2, 64, 16, torch.float32)
    qkv = randn(gen, 2, (8 + 2 * 2) * 64)
    query = qkv[:, : 8 * 64].view(2, 8, 64)
    args = (query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125, 70)
    out = paged_attention.paged_decode_attention(*args, num_partitions=2)
    assert_close(out, reference.paged_decode_attention(*args), torch.float32)


def test_split_decode_ignores_partials_left_by_an_earlier_call(monkeypatch):
    """A CUDA graph replays into the same partials buffers: a call whose contexts are now shorter must
    merge only its own live partitions, not the stale ones an earlier, longer call left behind."""
    buffers: list[torch.Tensor] = []  # a launch's three (partials, maxes, sums), handed out again in order
    served = itertools.count()

    def replayed(shape, device):
        i = next(served) % 3
        if len(buffers) <= i:
            buffers.append(torch.full(shape, float("nan"), device=device))
        assert buffers[i].shape == tuple(shape)
        return buffers[i]

    monkeypatch.setattr(paged_attention, "_scratch", replayed)
    gen = generator(18)
    kv = make_paged_kv(gen, [300, 45, 0, 129], 2, 64, 16, torch.float32)
    query = randn(gen, 4, 6, 64)
    for lens in ([300, 45, 0, 129], [100, 45, 0, 20]):  # the second call: seq 0 and 3 shrink
        context_lens = torch.tensor(lens, dtype=kv.context_lens.dtype, device=kv.context_lens.device)
        args = (query, kv.k_cache, kv.v_cache, kv.block_tables, context_lens, 0.125)
        out = paged_attention.paged_decode_attention(*args, num_partitions=4, out=nan_like(query))
        assert_close(out, reference.paged_decode_attention(*args), torch.float32)
    assert len(buffers) == 3 and not buffers[0][0, :, 2].isnan().any()  # seq 0's 3rd partition: stale data


def test_graph_sized_launch_splits_each_context_by_its_own_length(monkeypatch):
    """A CUDA graph launches for the longest context (a wide table): each sequence then uses only the
    partitions its own context needs. Here a 2048-key table gives 11 partitions of at least 128 keys:
    1400 keys are cut into all 11 (128 each; cut by the table's width they would fill 8 of 192), 100
    keys fit in one, written directly with no partials, an empty context gets zeros the same way."""
    made: list[torch.Tensor] = []
    monkeypatch.setattr(paged_attention, "_scratch", lambda shape, device: made.append(
        torch.full(shape, float("nan"), device=device)) or made[-1])
    gen = generator(21)
    lens = [1400, 100, 0]
    kv = make_paged_kv(gen, lens, 1, 64, 16, torch.float32)
    wide = torch.full((len(lens), 128), 10**6, dtype=kv.block_tables.dtype, device=kv.block_tables.device)
    wide[:, : kv.block_tables.shape[1]] = kv.block_tables  # junk past each context
    query = randn(gen, len(lens), 4, 64)
    args = (query, kv.k_cache, kv.v_cache, wide, kv.context_lens, 0.125)
    assert paged_attention.MIN_PARTITION_TOKENS == 128
    monkeypatch.setattr(paged_attention, "num_sms", lambda device: 8)  # as in the interpreter, on a GPU too
    assert paged_attention.choose_num_partitions(len(lens), 1, 128 * 16, 8) == 11
    out = paged_attention.paged_decode_attention(*args, out=nan_like(query))
    assert_close(out, reference.paged_decode_attention(*args), torch.float32)
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    partial = made[0]  # [seqs, heads, partitions, head_dim]: the unnormalised accumulators
    assert partial.shape[2] == 11
    assert not partial[0].isnan().any()  # every one of the long context's partitions written
    assert partial[1:].isnan().all()  # the short and the empty context wrote none


def test_batch_invariance():
    gen = generator(16)
    lens = [200, 31, 77, 5]
    kv = make_paged_kv(gen, lens, 2, 64, 16, torch.float32)
    query = randn(gen, len(lens), 8, 64)
    caches = (kv.k_cache, kv.v_cache)
    for parts in (1, 2):
        batch = paged_attention.paged_decode_attention(
            query, *caches, kv.block_tables, kv.context_lens, 0.125, num_partitions=parts
        )
        for b in range(len(lens)):
            alone = paged_attention.paged_decode_attention(
                query[b : b + 1], *caches, kv.block_tables[b : b + 1], kv.context_lens[b : b + 1], 0.125,
                num_partitions=parts,
            )
            # Same split: bitwise the same, whatever else is in the batch.
            assert torch.equal(alone[0], batch[b])
    # The automatic split depends on the batch, so only closeness is promised.
    auto = paged_attention.paged_decode_attention(
        query[:1], *caches, kv.block_tables[:1], kv.context_lens[:1], 0.125
    )
    torch.testing.assert_close(auto[0], batch[0], atol=1e-6, rtol=1e-6)


def test_split_heuristic():
    choose = paged_attention.choose_num_partitions
    assert choose(num_seqs=4, num_kv_heads=8, max_context_len=32768, num_sms=132) == 17  # ~4 programs per SM
    assert choose(num_seqs=33, num_kv_heads=8, max_context_len=32768, num_sms=132) == 1  # 2 per SM: left whole
    assert choose(num_seqs=32, num_kv_heads=8, max_context_len=32768, num_sms=132) == 3
    assert choose(num_seqs=256, num_kv_heads=8, max_context_len=32768, num_sms=132) == 1  # grid is full
    assert choose(num_seqs=1, num_kv_heads=8, max_context_len=100, num_sms=132) == 1  # too short
    assert choose(num_seqs=1, num_kv_heads=4, max_context_len=512, num_sms=132) == 4  # one partition per 128
    assert choose(num_seqs=1, num_kv_heads=1, max_context_len=10**6, num_sms=132) == 64  # capped


def _valid_args():
    gen = generator(17)
    kv = make_paged_kv(gen, [20, 40], 2, 64, 16, torch.float32)
    query = randn(gen, 2, 4, 64)
    return [query, kv.k_cache, kv.v_cache, kv.block_tables, kv.context_lens, 0.125]


@pytest.mark.parametrize(
    "mutate,message",
    [
        (lambda a: a.__setitem__(0, a[0].double()), "float16, bfloat16 or float32"),
        (lambda a: a.__setitem__(0, a[0].half()), "must equal the cache dtype"),
        (lambda a: a.__setitem__(3, a[3].long()), "block_tables must be torch.int32"),
        (lambda a: a[3].__setitem__((1, 1), a[1].shape[0]), "block ids outside"),
        (lambda a: a[3].__setitem__((0, 0), -1), "block ids outside"),
        (lambda a: a.__setitem__(4, a[4] + 100), "context_lens must lie in"),
        (lambda a: a.__setitem__(0, a[0][:, :3]), "multiple of num_kv_heads"),
        (lambda a: a.__setitem__(0, a[0].transpose(1, 2).contiguous().transpose(1, 2)), "stride 1"),
        (lambda a: a.__setitem__(2, a[2][..., :32]), "must match"),
    ],
    ids=["fp64", "dtype-mismatch", "int64-table", "block-past-end", "negative-block", "ctx-too-long",
         "heads", "strides", "cache-pair"],
)
def test_launcher_rejects_bad_inputs(mutate, message):
    args = _valid_args()
    mutate(args)
    with pytest.raises(ValueError, match=message):
        paged_attention.paged_decode_attention(*args)


def test_validation_memo_notices_in_place_changes():
    args = _valid_args()
    paged_attention.paged_decode_attention(*args)
    args[3][0, 0] = 10**6  # same tensor object, new version: must be checked again
    with pytest.raises(ValueError, match="block ids outside"):
        paged_attention.paged_decode_attention(*args)


def test_unchecked_bad_ids_are_clamped_not_read_out_of_bounds(monkeypatch):
    monkeypatch.setenv("LEANSERVE_KERNEL_CHECKS", "0")
    args = _valid_args()
    args[3][1, 1] = 10**6
    out = paged_attention.paged_decode_attention(*args)
    assert out.shape == args[0].shape


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_partitions", [1, None])
def test_decode_large_gpu(dtype, num_partitions):
    gen = generator(18)
    lens = torch.randint(1, 4096, (64,), generator=gen).tolist()
    case = (18, lens, 32, 8, 128, 16, dtype)
    out, expected, dtype = _run(case, num_partitions)
    assert_close(out, expected, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_decode_bf16_gpu(case):
    case = case[:-1] + (torch.bfloat16,)
    out, expected, dtype = _run(case, None)
    assert_close(out, expected, dtype)
