"""The K-major int4 GEMV and its repack, against the AWQ reference (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from leanserve.kernels import awq_reference  # noqa: E402
from leanserve.kernels.awq_reference import awq_gemm_reference, dequantize_awq, dequantize_k_major  # noqa: E402
from leanserve.kernels.int4_gemv import Int4GemvConfig, KMajorInt4, int4_gemv  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_layer(k: int, n: int, group: int, seed: int = 0) -> tuple[tuple[torch.Tensor, ...], KMajorInt4]:
    awq = tuple(t.to(DEVICE) for t in awq_reference.random_awq(k, n, group, seed))
    return awq, KMajorInt4.from_awq(*awq, group)


@pytest.mark.parametrize("k,n,group", [(256, 72, 64), (128, 8, 32), (384, 40, 128)])
def test_repack_keeps_every_weight_exactly(k: int, n: int, group: int) -> None:
    """The K-major words and fp16 factor pairs give back AWQ's dense weight bit for bit (zero points of
    15 and the nibble in the sign bit included: random_awq draws all of 0..15)."""
    (qweight, qzeros, scales), packed = random_layer(k, n, group, seed=k + n)
    assert packed.words.shape == (n, k // 8) and packed.factors.shape == (n, k // group)
    assert torch.equal(dequantize_k_major(packed.words, packed.factors, group),
                       dequantize_awq(qweight, qzeros, scales, group).T)


def test_repack_puts_pair_partners_side_by_side() -> None:
    """Input 32c + 8j + 2s + h sits in nibble j + 4h of word 4c + s (j < 4, h < 2): one weight set to 15
    among zeros shows where."""
    k, n, group = 64, 8, 32
    q = torch.zeros(k, n, dtype=torch.int64)
    q[32 + 8 * 2 + 2 * 3 + 1, 3] = 15  # chunk 1, pair 2, word 3 of the chunk, second of the pair; output 3
    z = torch.zeros(k // group, n, dtype=torch.int64)
    words, _ = awq_reference.repack_k_major(awq_reference.pack_awq(q), awq_reference.pack_awq(z),
                                            torch.ones(k // group, n, dtype=torch.float16), group)
    expected = torch.zeros(n, k // 8, dtype=torch.int64)
    expected[3, 4 * 1 + 3] = 15 << (4 * (2 + 4 * 1))
    assert torch.equal(words.to(torch.int64) & 0xFFFFFFFF, expected)


@pytest.mark.parametrize(
    "m,k,n,group,config",
    [
        (1, 256, 72, 64, Int4GemvConfig()),  # one tile, fewer warps for the short K
        (1, 256, 24, 64, Int4GemvConfig(block_n=16)),  # N ragged: the second program's last 8 rows not stored
        (1, 1536, 8, 384, Int4GemvConfig(num_warps=1)),  # 12-chunk groups: the second tile starts mid-group
        (2, 1536, 8, 96, Int4GemvConfig(num_warps=1)),  # 3-chunk groups, likewise
        (3, 384, 40, 128, Int4GemvConfig(block_n=4)),  # K not a whole tile: masked
        (2, 2048, 16, 32, Int4GemvConfig(block_n=4, num_warps=1)),  # K in 2 tiles: the prefetching loop
        (1, 1152, 24, 128, Int4GemvConfig(num_warps=1)),  # 36 chunks: a ragged last tile in the loop
        (1, 4096, 8, 64, Int4GemvConfig(num_warps=1, chunks_per_thread=2)),  # two chunks per thread, 2 tiles
        (7, 256, 24, 64, Int4GemvConfig()),  # 7 rows of x padded to 8, 2 output rows per program
        (4, 1152, 24, 128, Int4GemvConfig(num_warps=1)),  # 4 rows of x through the ragged loop
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_int4_gemv_matches_reference(m: int, k: int, n: int, group: int, config: Int4GemvConfig,
                                     dtype: torch.dtype) -> None:
    (qweight, qzeros, scales), packed = random_layer(k, n, group, seed=m + k)
    gen = torch.Generator().manual_seed(m * k)
    x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
    bias = torch.randn(n, generator=gen).to(DEVICE, dtype)
    out = int4_gemv(x, packed, bias, config=config)
    ref = awq_gemm_reference(x.float(), qweight, qzeros, scales, group, bias.float())
    assert out.dtype == dtype and out.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)


def test_rows_of_x_are_independent() -> None:
    """A row of x computed alone equals the same row in a batch (other rows, other rows per program), bit
    for bit, with a strided x."""
    _, packed = random_layer(256, 48, 64, seed=3)
    x = torch.randn(4, 512, generator=torch.Generator().manual_seed(4)).to(DEVICE)[:, :256]
    batch = int4_gemv(x, packed)
    for i in range(4):
        assert torch.equal(int4_gemv(x[i : i + 1], packed), batch[i : i + 1])


@pytest.mark.parametrize(
    "change,match",
    [
        (lambda x, w: (x[:, :64], w), "K=64"),
        (lambda x, w: (x.expand(9, -1), w), "at most 8"),
        (lambda x, w: (x, KMajorInt4(w.words, w.factors[:, :1].contiguous(), w.group_size)), "factors"),
        (lambda x, w: (x, KMajorInt4(w.words, w.factors, 48)), "groups of 48"),
        (lambda x, w: (x.int(), w), "float16, bfloat16 or float32"),
    ],
)
def test_rejects_bad_arguments(change, match: str) -> None:
    _, packed = random_layer(128, 16, 32)
    x, w = change(torch.randn(1, 128).to(DEVICE), packed)
    with pytest.raises(ValueError, match=match):
        int4_gemv(x, w)


def test_rejects_a_config_that_is_not_a_power_of_two() -> None:
    _, packed = random_layer(128, 16, 32)
    with pytest.raises(ValueError, match="block_n"):
        int4_gemv(torch.randn(1, 128).to(DEVICE), packed, config=Int4GemvConfig(block_n=6))


def test_half2_math_is_refused_where_it_cannot_run() -> None:
    """The fp16-pair products are PTX: compiled only, and for fp16 x only."""
    _, packed = random_layer(128, 16, 32)
    with pytest.raises(ValueError, match="half2"):
        int4_gemv(torch.randn(1, 128).to(DEVICE), packed, config=Int4GemvConfig(math="half2"))  # fp32 x
    with pytest.raises(ValueError, match="math"):
        int4_gemv(torch.randn(1, 128).to(DEVICE), packed, config=Int4GemvConfig(math="fp64"))


def test_default_math_is_half2_only_where_it_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    from leanserve.kernels import int4_gemv as module

    x16 = torch.randn(2, 128, dtype=torch.float16)
    monkeypatch.setattr(module, "interpreter_enabled", lambda: True)
    assert module.default_math(x16) == "fp32"  # the interpreter cannot run its PTX
    monkeypatch.setattr(module, "interpreter_enabled", lambda: False)
    assert module.default_math(x16) == "half2"
    assert module.default_math(x16.to(torch.bfloat16)) == "fp32"
    assert module.default_math(torch.randn(2, 129, dtype=torch.float16)[:, :128]) == "fp32"  # odd row stride
    assert module.default_math(x16.view(-1)[1:].view(1, 255)[:, :128]) == "fp32"  # rows not 4-byte aligned


def test_repack_rejects_k_that_is_not_whole_chunks() -> None:
    qweight, qzeros, scales = awq_reference.random_awq(48, 8, 16)
    with pytest.raises(ValueError, match="multiples of 32"):
        awq_reference.repack_k_major(qweight, qzeros, scales, 16)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4])
# The half2 math has its own unpack (``unpack`` does not reach it); the default math is test_default_math's.
@pytest.mark.parametrize("dtype,math,unpack", [(torch.float16, "fp32", "asm"), (torch.float16, "fp32", "shift"),
                                               (torch.bfloat16, "fp32", "asm"), (torch.bfloat16, "fp32", "shift"),
                                               (torch.float16, "half2", "asm")])
@pytest.mark.parametrize("pdl", [False, True])
def test_int4_gemv_at_a_7b_mlp_size(m: int, dtype: torch.dtype, math: str, unpack: str, pdl: bool) -> None:
    """Llama-7B's up projection (4096 x 11008, group 128: one tile per program at the default) and its
    down projection (11008 x 4096: a ragged loop), compiled, both unpackings (the half2 math has its
    own), PDL off and on."""
    gen = torch.Generator().manual_seed(m)
    for k, n in ((4096, 11008), (11008, 4096)):
        (qweight, qzeros, scales), packed = random_layer(k, n, 128, seed=m)
        x = torch.randn(m, k, generator=gen).to(DEVICE, dtype)
        out = int4_gemv(x, packed, config=Int4GemvConfig(unpack=unpack, pdl=pdl, math=math))
        ref = awq_gemm_reference(x.float(), qweight, qzeros, scales, 128)
        torch.testing.assert_close(out.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)
        # and close as a whole: the output's own rounding is ~3e-4 (fp16) / ~2e-3 (bf16) of its norm
        assert ((out.float() - ref).norm() / ref.norm()).item() < (2e-3 if dtype == torch.float16 else 8e-3)


@pytest.mark.parametrize("k,n,group", [(256, 40, 64), (1152, 24, 128)])  # N and K not whole tiles
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("tile", [{}, dict(block_n=8, chunks=8, num_warps=2), dict(block_n=4, chunks=16)])
def test_dequantize_writes_every_weight(k: int, n: int, group: int, dtype: torch.dtype, tile: dict) -> None:
    from leanserve.kernels.int4_gemv import dequantize_int4

    (qweight, qzeros, scales), packed = random_layer(k, n, group, seed=k)
    out = torch.full((n, k), float("nan"), device=DEVICE, dtype=dtype)
    dequantize_int4(packed, out, **tile)
    assert torch.equal(out, dequantize_awq(qweight, qzeros, scales, group).T.to(dtype))


@pytest.mark.parametrize("m", [1, 4, 5, 20])  # the GEMV up to LINEAR_GEMV_MAX_M (fp32 x: 4), dequantize above
def test_int4_linear_routes_by_rows_and_matches_reference(m: int, monkeypatch: pytest.MonkeyPatch) -> None:
    from leanserve.kernels import int4_gemv as module

    picked: list[str] = []
    for name in ("int4_gemv", "dequantize_int4"):
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _real=real, _name=name, **kw: picked.append(_name) or _real(*a, **kw))
    (qweight, qzeros, scales), packed = random_layer(256, 48, 64, seed=m)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, 256, generator=gen).to(DEVICE)
    bias = torch.randn(48, generator=gen).to(DEVICE)
    ref = awq_gemm_reference(x, qweight, qzeros, scales, 64, bias)
    torch.testing.assert_close(module.int4_linear(x, packed, bias), ref, atol=1e-5 * ref.abs().max().item(), rtol=0)
    assert picked == (["int4_gemv"] if m <= module.LINEAR_GEMV_MAX_M["fp32"] else ["dequantize_int4"])


@pytest.mark.parametrize("math,m,gemv", [("half2", 6, True), ("half2", 7, False)])  # fp32: the test above
def test_int4_linear_keeps_the_gemv_longer_with_the_half2_math(math: str, m: int, gemv: bool,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The crossover follows the math the GEMV would run: half2's GEMV beats dequantize + cuBLAS up to 6
    rows on an H200, the fp32 math's only up to 4."""
    from leanserve.kernels import int4_gemv as module

    picked: list[str] = []
    monkeypatch.setattr(module, "default_math", lambda x: math)
    monkeypatch.setattr(module, "int4_gemv", lambda *a, **kw: picked.append("gemv"))
    monkeypatch.setattr(module, "int4_dequant_linear", lambda *a, **kw: picked.append("dequantize"))
    module.int4_linear(torch.zeros(m, 256), random_layer(256, 48, 64)[1])
    assert picked == (["gemv"] if gemv else ["dequantize"])
