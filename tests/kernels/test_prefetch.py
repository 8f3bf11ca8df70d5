"""The L2 prefetch of the next kernel's weights (``kernels/_prefetch.py``): a hint that must never change
a result, and whose pieces must be legal bulk prefetches (16-byte aligned, multiples of 16 bytes) that
cover the bytes asked for."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

import triton.language as tl  # noqa: E402
from leanserve.kernels import _prefetch, gemv  # noqa: E402

from tests.kernels.kernel_cases import DEVICE, assert_matches, generator, randn  # noqa: E402


@triton.jit
def _record_pieces(start_ptr, size_ptr, total_bytes, piece_bytes, PIECES: tl.constexpr):
    """Stores each thread's (start, size) as the GEMV's prefetch computes them (``share_pieces``)."""
    program = tl.program_id(0)
    start, size = _prefetch.share_pieces(total_bytes, piece_bytes, program, PIECES)
    offs = program * PIECES + tl.arange(0, PIECES)
    tl.store(start_ptr + offs, start)
    tl.store(size_ptr + offs, size)


def pieces(total: int, piece: int, programs: int, per_program: int) -> list[tuple[int, int]]:
    """(start, size) of every thread's prefetch, from the kernels' own arithmetic (compiled on a GPU,
    interpreted on a CPU)."""
    starts = torch.full((programs * per_program,), -1, dtype=torch.int64, device=DEVICE)
    sizes = torch.full((programs * per_program,), -1, dtype=torch.int32, device=DEVICE)
    _record_pieces[(programs,)](starts, sizes, total, piece, PIECES=per_program)
    return list(zip(starts.tolist(), sizes.tolist(), strict=True))


@pytest.mark.parametrize("shape,dtype,programs,threads", [
    ((1000,), torch.float16, 3, 32),  # 2000 bytes over 96 threads
    ((2560, 2048), torch.bfloat16, 320, 128),  # a 1.1B qkv weight
    ((7, 3), torch.float16, 4, 64),  # 42 bytes: cut to 32
    ((6 << 20,), torch.float32, 100, 128),  # 24 MB: MAX_PREFETCH_BYTES exactly
    ((8 << 20,), torch.float32, 96, 128),  # 32 MB: cut to MAX_PREFETCH_BYTES
])
def test_pieces_are_legal_and_cover_the_bytes(shape, dtype, programs: int, threads: int,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_prefetch, "l2_prefetch_supported", lambda device: True)
    tensor = torch.empty(shape, dtype=dtype)
    ptr, total, piece, on = _prefetch.prefetch_args(tensor, programs, threads, fallback=torch.empty(1))
    assert on and ptr is tensor
    assert total == min(tensor.numel() * tensor.element_size(), _prefetch.MAX_PREFETCH_BYTES) // 16 * 16
    assert piece % 16 == 0 and piece > 0
    covered = 0
    for start, size in pieces(total, piece, programs, threads):
        assert start % 16 == 0 and size % 16 == 0 and 0 <= size <= piece
        if size:
            assert start == covered  # contiguous, no gap, no overlap
            covered += size
    assert covered == total


def test_off_where_a_bulk_prefetch_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    fallback = torch.empty(1)
    assert _prefetch.prefetch_args(torch.empty(64), 2, 32, fallback)[3] is False  # a CPU tensor: no device
    monkeypatch.setattr(_prefetch, "l2_prefetch_supported", lambda device: True)
    assert _prefetch.prefetch_args(None, 2, 32, fallback) == (fallback, 0, 0, False)
    assert _prefetch.prefetch_args(torch.empty(64, 64).t(), 2, 32, fallback)[3] is False  # not contiguous
    assert _prefetch.prefetch_args(torch.empty(64, dtype=torch.float16)[1:], 2, 32, fallback)[3] is False  # 2 B off
    assert _prefetch.prefetch_args(torch.empty(3, dtype=torch.float16), 2, 32, fallback)[3] is False  # < 16 bytes
    assert _prefetch.prefetch_args(torch.empty(64, device="meta"), 2, 32, fallback)[3] is False  # another device


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("position", ["early", "late"])
def test_a_prefetching_gemv_asks_for_the_tensor_and_gives_the_same_result(
    gated: bool, position: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The launcher hands ``prefetch_args`` the tensor (none while ``config.prefetch`` is off), shared by
    all of its programs, one piece per thread. Where the prefetch cannot run (the interpreter: no PTX)
    the kernel compiles it out and computes the same; on an sm_90 GPU the GPU test below runs it."""
    asked: list[tuple] = []
    real = gemv.prefetch_args
    monkeypatch.setattr(gemv, "prefetch_args", lambda *a: asked.append(a) or real(*a))
    gen = generator(31)
    x, w, after = randn(gen, 1, 96), randn(gen, 48, 96), randn(gen, 300, 20)
    plain, prefetching = gemv.GemvConfig(block_n=8, splits=2), gemv.GemvConfig(block_n=8, splits=2, prefetch=position)
    want = gemv.gemv(x, w, gated=gated, config=plain, prefetch=after)
    got = gemv.gemv(x, w, gated=gated, config=prefetching, prefetch=after)
    assert torch.equal(got, want)
    assert asked[0][0] is None and asked[1][0] is after
    if not gated:  # (gated launches go unsplit, with rows of their own)
        plan = gemv._plan(1, 48, 96, x.dtype, x.device, prefetching)
        assert asked[1][1:3] == (triton.cdiv(48, plan.block_n) * plan.splits, 32 * plan.num_warps)


def test_an_unknown_prefetch_position_is_refused() -> None:
    x, w = torch.ones(1, 64, device=DEVICE), torch.ones(8, 64, device=DEVICE)
    with pytest.raises(ValueError, match="prefetch"):
        gemv.gemv(x, w, config=gemv.GemvConfig(prefetch="sometimes"), prefetch=w)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_prefetching_gemv_at_tinyllama_shapes_gpu(pdl: bool) -> None:
    """Compiled, sm_90+ (elsewhere the prefetch is off and this is the plain GEMV): split-K, gated and
    residual launches, each prefetching a weight of another size (one past MAX_PREFETCH_BYTES), equal to
    the same launch without the prefetch."""
    gen = generator(32)
    x = randn(gen, 1, 2048, dtype=torch.bfloat16)
    after = [randn(gen, n, 2048, dtype=torch.bfloat16) for n in (2048, 11264)] + [
        torch.zeros(8192, 2048, dtype=torch.bfloat16, device=DEVICE)]  # 32 MB: cut to its first 24
    for n, k, kind in ((2560, 2048, "plain"), (11264, 2048, "gated"), (2048, 5632, "residual")):
        w = randn(gen, n, k, dtype=torch.bfloat16) * 0.03
        act = x if k == 2048 else randn(gen, 1, k, dtype=torch.bfloat16)
        for target in after:
            results = []
            for prefetch in (None, "early", "late"):
                config = gemv.GemvConfig(pdl=pdl, prefetch=prefetch)
                res = randn(generator(33), 1, n, dtype=torch.bfloat16) if kind == "residual" else None
                torch.cuda.synchronize()
                results.append(gemv.gemv(act, w, config=config, gated=kind == "gated", residual=res, out=res,
                                         prefetch=target))
            assert torch.equal(results[0], results[1]) and torch.equal(results[0], results[2])
        want = torch.nn.functional.linear(act.float(), w.float())
        if kind == "plain":
            assert_matches(results[1], want, torch.bfloat16)
