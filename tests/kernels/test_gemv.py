"""Triton GEMV (decode-sized linears) against ``F.linear``."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from leanserve.kernels import _device, gemv  # noqa: E402
from leanserve.kernels import reference as reference_ops  # noqa: E402
from leanserve.kernels.backend import trusted_inputs  # noqa: E402

from tests.kernels.kernel_cases import DEVICE, assert_matches, generator, nan_like, randn  # noqa: E402

# (M, N, K): N and K off every block size (K also off the 16-byte vector), powers of two, every M.
SHAPES = [(1, 70, 100), (3, 130, 264), (5, 33, 7), (8, 64, 256), (2, 40, 300), (7, 19, 520), (4, 24, 65)]


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.float(), w.float(), None if b is None else b.float())


def inputs(seed: int, m: int, n: int, k: int, dtype: torch.dtype, bias: bool):
    gen = generator(seed)
    x = randn(gen, m, k, dtype=dtype)
    w = randn(gen, n, k, dtype=dtype)
    b = randn(gen, n, dtype=dtype) if bias else None
    return x, w, b


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("splits", [1, 3])
def test_gemv_matches_f_linear(m: int, n: int, k: int, dtype: torch.dtype, splits: int) -> None:
    bias = (m + splits) % 2 == 0  # half the cases with a bias, across every shape and split
    x, w, b = inputs(m * n + k, m, n, k, dtype, bias)
    out = nan_like(torch.empty(m, n, dtype=dtype, device=DEVICE))
    # Small tiles so that even these shapes take several N blocks and several K tiles per slice.
    config = gemv.GemvConfig(block_n=8, block_k=32, splits=splits)
    got = gemv.gemv(x, w, b, config=config, out=out)
    assert got is out
    assert_matches(got, reference(x, w, b), dtype)


@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_persistent_gemv_matches_f_linear(m: int, n: int, k: int, dtype: torch.dtype) -> None:
    """The resident-grid launch: 8 programs here (the interpreter's 8 "SMs", one each), so most take
    several row blocks, each over several K tiles, the next one's first tile prefetched across blocks."""
    x, w, b = inputs(m * n + k + 1, m, n, k, dtype, bias=m % 2 == 1)
    out = nan_like(torch.empty(m, n, dtype=dtype, device=DEVICE))
    config = gemv.GemvConfig(block_n=4, block_k=32, persistent=True, programs_per_sm=1)
    got = gemv.gemv(x, w, b, config=config, out=out)
    assert got is out
    assert_matches(got, reference(x, w, b), dtype)


def test_default_config_matches_f_linear() -> None:
    x, w, b = inputs(1, 4, 300, 600, torch.float16, True)
    assert_matches(gemv.gemv(x, w, b), reference(x, w, b), torch.float16)


def test_split_reduction_ignores_stale_workspace_and_leaves_counters_at_zero() -> None:
    m, n, k = 3, 50, 256
    x, w, b = inputs(7, m, n, k, torch.float32, True)
    config = gemv.GemvConfig(block_n=16, block_k=32, splits=4)
    blocks = -(-n // 16)
    partials, counters = gemv.split_workspace(x.device, 4 * m * n, blocks)
    partials.fill_(float("nan"))  # every partial read must have been written by this call
    first = gemv.gemv(x, w, b, config=config)
    assert_matches(first, reference(x, w, b), torch.float32)
    assert counters.eq(0).all()
    # The second call finds the same workspace (a CUDA graph replays exactly this), and the sum's
    # order does not depend on which slice finished last.
    again = gemv.gemv(x, w, b, config=config)
    assert gemv.split_workspace(x.device, 4 * m * n, blocks)[0] is partials
    assert torch.equal(first, again)
    assert counters.eq(0).all()


def test_strided_rows_of_x_and_weight() -> None:
    gen = generator(11)
    # x: every other row of a wider buffer; weight: rows 5..45 of a fused [q; k; v]-like matrix.
    x = randn(gen, 6, 200, dtype=torch.float32)[::2, :150]
    fused = randn(gen, 60, 150, dtype=torch.float32)
    w = fused[5:45]
    got = gemv.gemv(x, w, config=gemv.GemvConfig(block_n=8, block_k=32, splits=2))
    assert_matches(got, reference(x, w, None), torch.float32)


def test_empty_dims_follow_f_linear() -> None:
    x = torch.ones(2, 0, device=DEVICE)
    b = torch.arange(3.0, device=DEVICE)
    assert torch.equal(gemv.gemv(x, torch.ones(3, 0, device=DEVICE), b), b.expand(2, 3))
    assert gemv.gemv(torch.ones(0, 4, device=DEVICE), torch.ones(3, 4, device=DEVICE)).shape == (0, 3)
    assert gemv.gemv(torch.ones(2, 4, device=DEVICE), torch.ones(0, 4, device=DEVICE)).shape == (2, 0)


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: (torch.ones(9, 8), torch.ones(4, 8), None), "at most 8"),
        (lambda: (torch.ones(2, 8), torch.ones(4, 7), None), "K = x's 8"),
        (lambda: (torch.ones(2, 8), torch.ones(4, 8, dtype=torch.float16), None), "dtype"),
        (lambda: (torch.ones(2, 8), torch.ones(4, 8), torch.ones(5)), "bias"),
        (lambda: (torch.ones(8, 2).t(), torch.ones(4, 8), None), "contiguous"),
        (lambda: (torch.ones(2, 8, dtype=torch.int32), torch.ones(4, 8), None), "float16"),
    ],
)
def test_rejects_bad_arguments_even_with_trusted_inputs(make, match: str) -> None:
    x, w, b = (t if t is None else t.to(DEVICE) for t in make())
    with trusted_inputs(), pytest.raises(ValueError, match=match):
        gemv.gemv(x, w, b)


def test_rejects_bad_config() -> None:
    x = torch.ones(1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="block_n"):
        gemv.gemv(x, x, config=gemv.GemvConfig(block_n=6))
    with pytest.raises(ValueError, match="splits"):
        gemv.gemv(x, x, config=gemv.GemvConfig(splits=0))


def test_linear_takes_one_row_with_pdl_and_leaves_the_rest_to_f_linear(monkeypatch) -> None:
    x, w, b = inputs(1, 2, 40, 64, torch.float32, True)
    calls = []
    real = gemv.gemv
    # The routing is asked as if PDL were on; the kernel itself runs without it (the interpreter has none).
    no_pdl = gemv.GemvConfig(pdl=False)
    monkeypatch.setattr(gemv, "gemv", lambda *a, **kw: calls.append(a[0].shape) or real(*a, config=no_pdl))
    monkeypatch.setattr(gemv, "pdl_enabled", lambda device: True)
    got = gemv.linear(x[:1].view(1, 1, 64), w, b)
    assert got.shape == (1, 1, 40) and calls == [(1, 64)]
    assert_matches(got.view(1, 40), reference(x[:1], w, b), torch.float32)
    assert gemv.linear(x[0], w, b).shape == (40,) and len(calls) == 2  # a 1-d input, as F.linear allows
    assert torch.equal(gemv.linear(x, w, b), F.linear(x, w, b)) and len(calls) == 2  # 2 rows: cuBLAS
    monkeypatch.setattr(gemv, "pdl_enabled", lambda device: False)
    assert torch.equal(gemv.linear(x[:1], w, b), F.linear(x[:1], w, b)) and len(calls) == 2


def test_pdl_only_on_cuda_sm90_outside_the_interpreter(monkeypatch) -> None:
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setattr(_device, "_cuda_capability", lambda index: (9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv("LEANSERVE_PDL", raising=False)
    assert _device.pdl_enabled(cuda0)  # on by default where supported
    monkeypatch.setenv("LEANSERVE_PDL", "1")
    assert _device.pdl_enabled(cuda0)
    assert not _device.pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("LEANSERVE_PDL", "0")
    assert not _device.pdl_enabled(cuda0)
    monkeypatch.setenv("LEANSERVE_PDL", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not _device.pdl_enabled(cuda0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_device, "_cuda_capability", lambda index: (8, 0))
    assert not _device.pdl_enabled(cuda0)


# Compiled on a GPU: the 1.1B model's projections at every decode batch, PDL off and on, and a CUDA
# graph of back-to-back split launches sharing one workspace.
TINYLLAMA = [(2560, 2048), (2048, 2048), (11264, 2048), (2048, 5632)]


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", TINYLLAMA)
@pytest.mark.parametrize("pdl", [False, True])
def test_projections_gpu(n: int, k: int, pdl: bool) -> None:
    for m in range(1, 9):
        x, w, b = inputs(m + n, m, n, k, torch.bfloat16, m % 2 == 0)
        torch.cuda.synchronize()  # with PDL, W is read before the wait: not the output of the last kernel
        assert_matches(gemv.gemv(x, w, b, config=gemv.GemvConfig(pdl=pdl)), reference(x, w, b), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", TINYLLAMA)
@pytest.mark.parametrize("pdl", [False, True])
def test_persistent_projections_gpu(n: int, k: int, pdl: bool) -> None:
    """The resident-grid launch at the 1.1B model's shapes: 264 programs streaming 256-1408 row blocks."""
    for m in (1, 2, 8):
        x, w, b = inputs(m + n + 1, m, n, k, torch.bfloat16, m % 2 == 0)
        torch.cuda.synchronize()
        got = gemv.gemv(x, w, b, config=gemv.GemvConfig(pdl=pdl, persistent=True))
        assert_matches(got, reference(x, w, b), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
@pytest.mark.parametrize("persistent", [False, True])
def test_chain_in_cuda_graph_gpu(pdl: bool, persistent: bool) -> None:
    gen = generator(5)
    x = randn(gen, 2, 2048, dtype=torch.bfloat16)
    weights = [randn(gen, 2048, 2048, dtype=torch.bfloat16) * 0.03 for _ in range(4)]
    torch.cuda.synchronize()

    def chain() -> torch.Tensor:
        h = x
        for w in weights:
            h = gemv.gemv(h, w, config=gemv.GemvConfig(pdl=pdl, persistent=persistent))
        return h

    eager = chain()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain()
    for _ in range(3):
        captured.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(captured, eager)


# The decode fusions (SiLU-and-mul of a stacked gate/up, a residual add), against the two-kernel forms of
# reference.py computed in fp32.
FUSION_SHAPES = [(1, 70, 100, 1), (3, 130, 264, 3), (2, 40, 300, 1), (1, 24, 1024, 2)]


@pytest.mark.parametrize("m,n,k,splits", FUSION_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("fusion", ["gated", "residual"])
@pytest.mark.parametrize("persistent", [False, True])
def test_decode_fusions_match_their_two_kernel_forms(m: int, n: int, k: int, splits: int, dtype: torch.dtype,
                                                     fusion: str, persistent: bool) -> None:
    from leanserve.kernels import reference as ref

    gated = fusion == "gated"
    x, w, b = inputs(m + n + k, m, 2 * n if gated else n, k, dtype, bias=m % 2 == 1)
    gen = generator(k)
    residual = randn(gen, m, n, dtype=dtype) if fusion == "residual" else None
    xf, wf, bf = x.float(), w.float(), None if b is None else b.float()
    want = ref.linear(xf, wf, bf)
    if gated:
        gate, up = want.to(dtype).float().chunk(2, dim=-1)  # rounded where silu_and_mul's input is
        want = (torch.nn.functional.silu(gate).to(dtype).float() * up)
    if residual is not None:
        want = want + residual.float()
    out = None if residual is None else residual
    before = None if residual is None else residual.clone()
    config = gemv.GemvConfig(block_n=8, block_k=32, splits=splits, persistent=persistent, programs_per_sm=1)
    got = gemv.gemv(x, w, b, config=config, out=out, residual=residual, gated=gated)
    assert got.shape == (m, n)
    if residual is not None:
        assert got is residual and not torch.equal(residual, before)  # updated in place
    assert_matches(got, want, dtype)


def test_decode_fusions_take_the_gemv_only_where_linear_does(monkeypatch) -> None:
    """norm_linear / norm_gated_linear / linear_residual: the fused GEMV (gated, residual) at one row with
    PDL, the separate kernels otherwise; both give the reference's numbers, and linear_residual updates
    the residual. The norm is always its own kernel (folded into the GEMV it was slower)."""
    from leanserve.kernels import reference as ref

    calls: list[dict] = []
    real = gemv.gemv
    no_pdl = gemv.GemvConfig(pdl=False)
    monkeypatch.setattr(gemv, "gemv", lambda *a, config=None, **kw: calls.append(kw) or real(*a, config=no_pdl, **kw))
    gen = generator(11)
    w, w2, gamma = randn(gen, 48, 64), randn(gen, 64, 24), randn(gen, 64)
    for rows, pdl in ((1, True), (1, False), (2, True)):
        monkeypatch.setattr(gemv, "pdl_enabled", lambda device, pdl=pdl: pdl)
        calls.clear()
        x, act, res = randn(gen, rows, 64), randn(gen, rows, 24), randn(gen, rows, 64)
        assert_matches(gemv.norm_linear(x, gamma, 1e-6, w), ref.norm_linear(x, gamma, 1e-6, w), torch.float32)
        assert_matches(gemv.norm_gated_linear(x, gamma, 1e-6, w), ref.norm_gated_linear(x, gamma, 1e-6, w),
                       torch.float32)
        want = ref.linear_residual(act, w2, None, res)
        got = gemv.linear_residual(act, w2, None, res)
        assert got is res
        assert_matches(got, want, torch.float32)
        fused = [c for c in calls if c.get("gated") or c.get("residual") is not None]
        assert len(fused) == (2 if (rows, pdl) == (1, True) else 0)
        assert len(calls) == (3 if (rows, pdl) == (1, True) else 0)  # and norm_linear's plain GEMV


def test_decode_fusions_reject_mismatched_operands() -> None:
    x, w = torch.ones(1, 64, device=DEVICE), torch.ones(6, 64, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        gemv.gemv(x, w, residual=torch.ones(1, 5, device=DEVICE))
    with pytest.raises(ValueError, match="even"):
        gemv.gemv(x, torch.ones(5, 64, device=DEVICE), gated=True)


@pytest.mark.gpu
@pytest.mark.parametrize("pdl", [False, True])
def test_decode_fusions_at_tinyllama_shapes_gpu(pdl: bool) -> None:
    """The 1.1B model's fused projections, compiled, bf16: gate_up gated, o and down adding into the
    residual stream in place."""
    from leanserve.kernels import reference as ref

    gen = generator(12)
    config = gemv.GemvConfig(pdl=pdl)
    x = randn(gen, 1, 2048, dtype=torch.bfloat16)
    for n, k, fusion in ((11264, 2048, "gated"), (2048, 2048, "residual"),
                         (2048, 5632, "residual")):
        w = randn(gen, n, k, dtype=torch.bfloat16) * 0.03
        act = randn(gen, 1, k, dtype=torch.bfloat16)
        torch.cuda.synchronize()  # with PDL, W is read before the wait: not the output of the last kernel
        if fusion == "residual":
            res = x.clone()
            want = ref.linear_residual(act.float(), w.float(), None, res.float())
            got = gemv.gemv(act, w, config=config, residual=res, out=res)
        else:
            want = ref.silu_and_mul(ref.linear(x.float(), w.float()))
            got = gemv.gemv(x, w, config=config, gated=True)
        assert_matches(got, want, torch.bfloat16)


def test_gated_output_rounds_as_silu_and_mul() -> None:
    """``gated`` rounds the gate, its SiLU and up to x's dtype where ``silu_and_mul`` of an fp16 linear
    does. With x one-hot the linear's sums are exact, so only those roundings can differ: the outputs must
    be equal but for rare last-place ties of the fp32 SiLU (x / (1 + e^-x) against torch's own)."""
    gen = generator(11)
    k, n = 64, 512
    x = torch.zeros(1, k, dtype=torch.float16)
    x[0, 5] = 1.0
    w = (3 * randn(gen, 2 * n, k, dtype=torch.float32)).to(torch.float16).cpu()
    want = reference_ops.silu_and_mul(F.linear(x, w))  # fp16 all the way, as the layer path runs it
    got = gemv.gemv(x.to(DEVICE), w.to(DEVICE), gated=True).cpu()
    assert got.dtype == torch.float16
    assert (got == want).float().mean() >= 0.99
    torch.testing.assert_close(got, want, atol=0, rtol=2**-9)  # no more than one fp16 step apart
