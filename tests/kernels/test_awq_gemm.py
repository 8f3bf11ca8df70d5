"""The AWQ fused dequantize-GEMM against its plain-torch reference (Triton interpreter on CPU)."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from leanserve.kernels import awq_reference  # noqa: E402
from leanserve.kernels.awq_gemm import awq_gemm  # noqa: E402
from leanserve.kernels.awq_reference import awq_gemm_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def random_awq(k: int, n: int, group: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(DEVICE) for t in awq_reference.random_awq(k, n, group, seed))


@pytest.mark.parametrize(
    "m,k,n,group,mode",
    [
        (1, 128, 64, 32, "gemv"),
        (3, 256, 72, 64, "gemv"),  # N not a multiple of the output block
        (5, 384, 64, 128, "gemv"),  # 3 groups: the K split leaves a short last slice
        (1, 384, 64, 384, "gemv"),  # a group of 384 (not a power of two): three 128-row tiles
        (2, 576, 64, 576, "gemv"),  # one group of the whole row (group size -1), 9 tiles of 64
        (17, 128, 64, 32, "tiled"),
        (40, 256, 80, 128, "tiled"),
        (9, 256, 264, 64, "dequant"),  # N not a multiple of the 256-column store tile
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_awq_gemm_matches_reference(m: int, k: int, n: int, group: int, mode: str, dtype: torch.dtype) -> None:
    qweight, qzeros, scales = random_awq(k, n, group)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    bias = torch.randn(n).to(DEVICE, dtype)
    out = awq_gemm(x, qweight, qzeros, scales, group, bias, force=mode)
    ref = awq_gemm_reference(x.float(), qweight, qzeros, scales, group, bias.float())
    assert out.dtype == dtype and out.shape == (m, n)
    tol = 1e-4 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.float(), ref, atol=tol * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    "config",
    [
        {"splits": 1},  # direct store, bias added in the kernel
        {"splits": 2, "block_c": 16, "block_k": 32, "num_stages": 1},
        {"splits": 1, "block_c": 32, "block_k": 64, "num_warps": 8},
        # loads straight to registers, several rows per thread folded into one layout tile of accumulators
        {"block_c": 32, "block_k": 64, "num_stages": 1},
        {"block_c": 32, "block_k": 16, "acc_k": 2},  # a fold across threads: slow, still right
        {"block_c": 32, "block_k": 32, "acc_k": 32},  # no fold (the ring kernel's accumulators)
        {"block_c": 32, "block_k": 64, "num_warps": 1, "maxnreg": 192},  # a register cap (compiled only)
        {"block_c": 16, "block_k": 64, "num_stages": 1, "num_warps": 1, "splits": 2},  # 2 groups per slice
    ],
)
def test_gemv_launch_configs_match_reference(config: dict[str, int]) -> None:
    k, n, group = 256, 200, 64  # N not a multiple of any output block
    qweight, qzeros, scales = random_awq(k, n, group, seed=5)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, k, generator=gen).to(DEVICE, torch.float16)
    bias = torch.randn(n, generator=gen).to(DEVICE, torch.float16)
    out = awq_gemm(x, qweight, qzeros, scales, group, bias, force="gemv", gemv_config=config)
    ref = awq_gemm_reference(x.float(), qweight, qzeros, scales, group, bias.float())
    assert out.dtype == torch.float16 and not out.isnan().any()
    torch.testing.assert_close(out.float(), ref, atol=2e-3 * ref.abs().max().item(), rtol=0)


@pytest.mark.parametrize(
    "config",
    [{"block_m": 16, "block_c": 4, "block_k": 16}, {"block_m": 32, "block_c": 16, "block_k": 32, "num_warps": 8}],
)
def test_tiled_launch_configs_match_reference(config: dict[str, int]) -> None:
    k, n, group = 128, 200, 32  # N not a multiple of any output block, M not of any row block
    qweight, qzeros, scales = random_awq(k, n, group, seed=7)
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(20, k, generator=gen).to(DEVICE, torch.float16)
    out = awq_gemm(x, qweight, qzeros, scales, group, force="tiled", tiled_config=config)
    ref = awq_gemm_reference(x.float(), qweight, qzeros, scales, group)
    torch.testing.assert_close(out.float(), ref, atol=2e-3 * ref.abs().max().item(), rtol=0)


def test_split_gemv_leaves_its_workspace_zero_for_the_next_launch() -> None:
    """The split-K slices meet in a shared workspace that the last slice of each block resets: two
    layers of different shapes called back to back both come out right, and the workspace is zero after."""
    from leanserve.kernels import _workspace

    gen = torch.Generator().manual_seed(9)
    cases = [
        (320, 136, 64, {"splits": 2}),  # 5 groups in 2 slices: 3 groups, then 2
        (256, 264, 32, {"splits": 8, "block_c": 16, "block_k": 32}),  # one group per slice, 3 output blocks
    ]
    for k, n, group, config in cases * 2:
        qweight, qzeros, scales = random_awq(k, n, group, seed=k + n)
        x = torch.randn(3, k, generator=gen).to(DEVICE, torch.float32)
        out = awq_gemm(x, qweight, qzeros, scales, group, force="gemv", gemv_config=config)
        ref = awq_gemm_reference(x, qweight, qzeros, scales, group)
        torch.testing.assert_close(out, ref, atol=1e-4 * ref.abs().max().item(), rtol=0)
        sums = _workspace.buffers("awq sums")
        counters = _workspace.buffers("split-K arrival counters")
        assert sums and counters and not any(t.any() for t in sums + counters)


def test_gemv_rejects_a_block_k_that_does_not_divide_the_group() -> None:
    qweight, qzeros, scales = random_awq(128, 32, 64)
    with pytest.raises(ValueError, match="block_k"):
        awq_gemm(torch.randn(1, 128).to(DEVICE), qweight, qzeros, scales, 64, gemv_config={"block_k": 48})


def test_gemv_rejects_accumulator_rows_that_do_not_divide_block_k() -> None:
    qweight, qzeros, scales = random_awq(128, 256, 64)
    with pytest.raises(ValueError, match="acc_k"):
        awq_gemm(torch.randn(1, 128).to(DEVICE), qweight, qzeros, scales, 64, gemv_config={"block_k": 32, "acc_k": 12})


def test_gemv_rejects_a_tile_smaller_than_its_warps() -> None:
    qweight, qzeros, scales = random_awq(128, 32, 64)
    with pytest.raises(ValueError, match="too small"):
        awq_gemm(torch.randn(1, 128).to(DEVICE), qweight, qzeros, scales, 64,
                 gemv_config={"block_c": 8, "block_k": 8, "num_warps": 4})


def test_dequantize_writes_every_weight_in_awq_column_order() -> None:
    from leanserve.kernels.awq_gemm import awq_dequantize
    from leanserve.kernels.awq_reference import dequantize_awq

    qweight, qzeros, scales = random_awq(128, 72, 32, seed=12)
    out = torch.full((128, 72), float("nan"), device=DEVICE)
    awq_dequantize(qweight, qzeros, scales, 32, out)
    torch.testing.assert_close(out, dequantize_awq(qweight, qzeros, scales, 32).float(), rtol=0, atol=1e-6)


def test_rejects_mismatched_shapes() -> None:
    qweight, qzeros, scales = random_awq(64, 32, 32)
    with pytest.raises(ValueError, match="K=48"):
        awq_gemm(torch.randn(2, 48).to(DEVICE), qweight, qzeros, scales, 32)
    with pytest.raises(ValueError, match="qzeros"):
        awq_gemm(torch.randn(2, 64).to(DEVICE), qweight, qzeros, scales, 16)


@pytest.mark.parametrize("backend", ["triton", "kmajor"])
def test_awq_linear_cuda_backends_match_reference(backend: str) -> None:
    """The serving module's CUDA paths (here interpreted) compute what its reference path does."""
    from leanserve.quant.awq_format import quantize_weight
    from leanserve.quant.awq_linear import AWQLinear

    gen = torch.Generator().manual_seed(4)
    shards = [torch.randn(size, 64, generator=gen) * 0.05 for size in (32, 16)]
    layers = {}
    for kind in (backend, "reference"):
        layer = AWQLinear(64, [32, 16], bias=False, group_size=32, dtype=torch.float32, backend=kind)
        for i, w in enumerate(shards):
            for name, t in quantize_weight(w, 32).to_awq().items():
                layer.load_shard(name, i, t)
        layer.finalize()
        layers[kind] = layer.to(DEVICE)
    if backend == "kmajor":  # repacked once, the AWQ tensors gone
        assert layers[backend].words is not None and not hasattr(layers[backend], "qweight")
    for m in (1, 20):  # the GEMV, and the tiled launch or dequantize + matmul
        x = torch.randn(m, 64, generator=gen).to(DEVICE)
        torch.testing.assert_close(layers[backend](x), layers["reference"](x), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 3, 8])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("unpack", ["asm", "shift"])
def test_gemv_at_a_7b_mlp_size(m: int, dtype: torch.dtype, unpack: str) -> None:
    """A Llama-7B up projection (4096 x 11008, group 128), twice: the split-K slices of thousands of
    programs meet through the shared workspace, which the first call must leave clean for the second.
    Both nibble unpackings; the PTX one runs only compiled, so only here."""
    qweight, qzeros, scales = random_awq(4096, 11008, 128, seed=m)
    x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(m)).to(DEVICE, dtype)
    ref = awq_gemm_reference(x.float(), qweight, qzeros, scales, 128)
    for _ in range(2):
        out = awq_gemm(x, qweight, qzeros, scales, 128, force="gemv", gemv_config={"unpack": unpack})
        torch.testing.assert_close(out.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["tiled", "dequant"])
def test_prefill_launches_at_a_7b_mlp_size(mode: str) -> None:
    qweight, qzeros, scales = random_awq(4096, 11008, 128, seed=3)
    x = torch.randn(300, 4096, generator=torch.Generator().manual_seed(3)).to(DEVICE, torch.float16)
    ref = awq_gemm_reference(x.float(), qweight, qzeros, scales, 128)
    out = awq_gemm(x, qweight, qzeros, scales, 128, force=mode)
    torch.testing.assert_close(out.float(), ref, atol=1e-2 * ref.abs().max().item(), rtol=0)


def test_default_launch_follows_the_row_thresholds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without ``force`` the rows pick the launch: GEMV up to GEMV_MAX_M, the tiled kernel below
    DEQUANT_MIN_M, dequantize + matmul from there; each routed call still matches the reference."""
    from leanserve.kernels import awq_gemm as module

    picked: list[str] = []
    for name in ("_gemv", "_tiled", "_dequant_matmul"):
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _real=real, _name=name, **kw: picked.append(_name) or _real(*a, **kw))
    qweight, qzeros, scales = random_awq(128, 64, 64, seed=13)
    gen = torch.Generator().manual_seed(14)
    cases = {module.GEMV_MAX_M: "_gemv", module.GEMV_MAX_M + 1: "_tiled",
             module.DEQUANT_MIN_M - 1: "_tiled", module.DEQUANT_MIN_M: "_dequant_matmul"}
    for m, expected in cases.items():
        x = torch.randn(m, 128, generator=gen).to(DEVICE, torch.float16)
        out = awq_gemm(x, qweight, qzeros, scales, 64)
        ref = awq_gemm_reference(x.float(), qweight, qzeros, scales, 64)
        assert picked[-1] == expected, (m, picked)
        torch.testing.assert_close(out.float(), ref, atol=2e-3 * ref.abs().max().item(), rtol=0)
