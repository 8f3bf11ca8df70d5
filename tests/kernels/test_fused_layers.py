"""Triton RMSNorm (+ residual) and rotary embedding against their torch references."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from leanserve.kernels import backend, reference  # noqa: E402
from leanserve.kernels.fused_layers import apply_rotary, rms_norm, silu_and_mul  # noqa: E402
from leanserve.kernels.kv_cache import write_kv_cache_rotary  # noqa: E402

from tests.kernels.kernel_cases import DEVICE, TOLERANCES, generator, randn, rotary_tables  # noqa: E402

DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("rows,cols", [(1, 64), (7, 576), (3, 100), (16, 2048)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm_matches_reference(rows: int, cols: int, dtype: torch.dtype, with_residual: bool) -> None:
    gen = generator(rows * cols)
    # x is a strided view (every other row of a wider buffer), as slices of fused outputs are.
    x = randn(gen, 2 * rows, cols + 8, dtype=dtype)[::2, :cols]
    weight = randn(gen, cols, dtype=dtype)
    residual = randn(gen, rows, cols, dtype=dtype) if with_residual else None
    got = rms_norm(x, weight, 1e-6, residual)
    want = reference.rms_norm(x, weight, 1e-6, residual)
    atol, rtol = TOLERANCES[dtype]
    if with_residual:
        torch.testing.assert_close(got[1], want[1], atol=0, rtol=0)  # the sum is rounded the same way
        got, want = got[0], want[0]
    assert got.shape == (rows, cols) and torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


def test_rms_norm_flattens_leading_dims() -> None:
    gen = generator(3)
    x, weight = randn(gen, 2, 5, 64), randn(gen, 64)
    torch.testing.assert_close(rms_norm(x, weight, 1e-5), reference.rms_norm(x, weight, 1e-5), atol=1e-5, rtol=1e-5)


def test_rms_norm_rejects_mismatched_weight() -> None:
    with pytest.raises(ValueError, match="weight"):
        rms_norm(torch.ones(2, 8, device=DEVICE), torch.ones(4, device=DEVICE), 1e-6)


@pytest.mark.parametrize(
    "tokens,heads,kv_heads,head_dim",
    [(1, 4, 4, 64), (5, 9, 3, 64), (3, 32, 8, 128), (4, 6, 2, 48)],  # 48: half of 24 is no power of 2
)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_in_place_on_fused_qkv_matches_reference(
    tokens: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype
) -> None:
    gen = generator(tokens * heads + head_dim)
    q_size, kv_size = heads * head_dim, kv_heads * head_dim
    qkv = randn(gen, tokens, q_size + 2 * kv_size, dtype=dtype)
    before = qkv.clone()
    q = qkv[:, :q_size].view(tokens, heads, head_dim)
    k = qkv[:, q_size : q_size + kv_size].view(tokens, kv_heads, head_dim)
    cos, sin = rotary_tables(300, head_dim // 2)
    positions = torch.tensor([0, 299, 17, 150, 1][:tokens], device=DEVICE)
    want_q, want_k = reference.apply_rotary(q.clone(), k.clone(), positions, cos, sin)
    got_q, got_k = apply_rotary(q, k, positions, cos, sin)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got_q, want_q, atol=atol, rtol=rtol)
    torch.testing.assert_close(got_k, want_k, atol=atol, rtol=rtol)
    # In place on the views, and the V part of the buffer untouched.
    torch.testing.assert_close(qkv[:, :q_size].view_as(want_q), want_q, atol=atol, rtol=rtol)
    assert torch.equal(qkv[:, q_size + kv_size :], before[:, q_size + kv_size :])


def test_rotary_rejects_positions_past_the_table() -> None:
    q, k = torch.zeros(2, 2, 8, device=DEVICE), torch.zeros(2, 1, 8, device=DEVICE)
    cos, sin = rotary_tables(16, 4)
    with pytest.raises(ValueError, match="positions"):
        apply_rotary(q, k, torch.tensor([3, 16], device=DEVICE), cos, sin)


def test_model_ops_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    # A model on CPU runs the references even while the interpreter is on for these tests.
    cpu = backend.get_model_ops("cpu")
    assert (cpu.attention.name, cpu.layers.name) == ("reference", "reference")
    monkeypatch.setattr(backend, "triton_available", lambda: True)
    cuda = backend.get_model_ops("cuda")
    assert (cuda.attention.name, cuda.layers.name) == ("triton", "triton")
    assert cuda.layers.rms_norm is rms_norm and cuda.attention.write_kv_cache_rotary is write_kv_cache_rotary


@pytest.mark.parametrize("rows,cols", [(1, 64), (5, 1536), (3, 100)])  # 1536: two column blocks
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_reference(rows: int, cols: int, dtype: torch.dtype) -> None:
    gen = generator(rows + cols)
    x = randn(gen, rows, 2 * cols + 4, dtype=dtype)[:, : 2 * cols]  # a strided view
    got = silu_and_mul(x)
    atol, rtol = TOLERANCES[dtype]
    assert got.shape == (rows, cols) and torch.isfinite(got).all()
    torch.testing.assert_close(got, reference.silu_and_mul(x), atol=atol, rtol=rtol)
