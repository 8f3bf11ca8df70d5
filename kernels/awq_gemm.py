"""Fused dequantize-GEMM for AWQ int4 weights (AutoAWQ "GEMM" layout, see ``awq_reference``).

``y [M, N] = x [M, K] @ W [K, N]`` where ``W`` never exists in memory: each program loads packed int32
words, shifts out the nibbles in AWQ's interleaved order, subtracts the zero point and multiplies by
the group scale in registers, then feeds the tile to the tensor cores. Two shapes of launch:

- GEMV (small ``M``, decode): one program per (row, block of outputs, slice of K). Decode is bound by
  reading weights, and ``N / BLOCK_N`` programs alone cannot fill a GPU, so K is split too and the
  partial sums meet in an fp32 buffer with atomic adds.
- tiled (larger ``M``, prefill): ``BLOCK_M x BLOCK_N`` output tiles, ``tl.dot`` over K steps. A K step
  never straddles a group (``group_size % BLOCK_K == 0``), so each step loads one row of zeros/scales.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GEMV_MAX_M = 8  # at or below this many rows the GEMV launch wins (weight-read bound)


@triton.jit
def _nibble_shifts(offs_n):
    # Column j of an 8-column block sits in nibble (j % 2) * 4 + j // 2 (AWQ order 0,2,4,6,1,3,5,7).
    j = offs_n % 8
    return ((j % 2) * 4 + j // 2) * 4


@triton.jit
def _awq_gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, acc_ptr,
    N, K, stride_xm,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """SPLIT: add this K slice's partial sums into the fp32 ``acc`` (zeroed by the launcher);
    otherwise the program owns its outputs and stores them (plus the bias) in ``acc``'s dtype."""
    pid_n = tl.program_id(0)
    row = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    n8 = N // 8
    cols = offs_n // 8
    shifts = _nibble_shifts(offs_n)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)  # K % BLOCK_K == 0: no K mask inside
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + row * stride_xm + offs_k).to(tl.float32)
        words = tl.load(qw_ptr + offs_k[:, None] * n8 + cols[None, :], mask=n_mask[None, :], other=0)
        q = (words >> shifts[None, :]) & 0xF
        g = k0 // GROUP  # BLOCK_K divides GROUP: one group per step
        zeros = (tl.load(qz_ptr + g * n8 + cols, mask=n_mask, other=0) >> shifts) & 0xF
        scales = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w = (q - zeros[None, :]).to(tl.float32) * scales[None, :]
        acc += tl.sum(x[:, None] * w, axis=0)
    if SPLIT:
        tl.atomic_add(acc_ptr + row * N + offs_n, acc, mask=n_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(acc_ptr + row * N + offs_n, acc.to(acc_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _awq_gemm_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    n8 = N // 8
    cols = offs_n // 8
    shifts = _nibble_shifts(offs_n)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K % BLOCK_K == 0: no K mask
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        words = tl.load(qw_ptr + offs_k[:, None] * n8 + cols[None, :], mask=n_mask[None, :], other=0)
        q = (words >> shifts[None, :]) & 0xF
        g = k0 // GROUP
        zeros = (tl.load(qz_ptr + g * n8 + cols, mask=n_mask, other=0) >> shifts) & 0xF
        scales = tl.load(s_ptr + g * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w = ((q - zeros[None, :]).to(tl.float32) * scales[None, :]).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _block_k(group_size: int) -> int:
    """Largest power of two <= 64 dividing the group size (tl.dot needs >= 16)."""
    block = 64
    while block > 16 and group_size % block:
        block //= 2
    if group_size % block:
        raise ValueError(f"AWQ group size {group_size} must be a multiple of 16 for the Triton kernel")
    return block


def _check(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int):
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16, torch.float32) or x.stride(-1) != 1:
        raise ValueError(f"x must be a 2-d fp16/bf16/fp32 tensor, contiguous in K; got {x.dtype} {tuple(x.shape)}")
    k, n8 = qweight.shape
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise ValueError("qweight and qzeros must be int32")
    if x.shape[1] != k or k % group:
        raise ValueError(f"x has K={x.shape[1]}, qweight {tuple(qweight.shape)}, group size {group}")
    if tuple(qzeros.shape) != (k // group, n8) or tuple(scales.shape) != (k // group, n8 * 8):
        raise ValueError(
            f"qzeros {tuple(qzeros.shape)} / scales {tuple(scales.shape)} do not match qweight "
            f"{tuple(qweight.shape)} with group size {group}"
        )
    devices = {t.device for t in (x, qweight, qzeros, scales)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")
    if not (qweight.is_contiguous() and qzeros.is_contiguous() and scales.is_contiguous()):
        raise ValueError("qweight, qzeros and scales must be contiguous")


def awq_gemm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
    force: str | None = None,  # "gemv" or "tiled": pick the launch (tests); default by M
    gemv_config: dict[str, int] | None = None,  # block_n / block_k / splits / num_warps (benchmarks)
) -> torch.Tensor:
    """``x [M, K] @ dequant(W) [K, N] (+ bias)`` in ``x.dtype``, accumulating in fp32."""
    _check(x, qweight, qzeros, scales, group_size)
    m, k = x.shape
    n = scales.shape[1]
    block_k = _block_k(group_size)
    use_gemv = force == "gemv" or (force is None and m <= GEMV_MAX_M)
    if use_gemv:
        return _gemv(x, qweight, qzeros, scales, group_size, bias, **(gemv_config or {}))
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 64 if n <= 2048 or m <= 32 else 128
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _awq_gemm_kernel[grid](
        x, qweight, qzeros, scales, bias if bias is not None else scales, out,
        m, n, k, x.stride(0), out.stride(0),
        GROUP=group_size, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


def _gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    block_n: int = 64,
    block_k: int | None = None,
    splits: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    m, k = x.shape
    n = scales.shape[1]
    block_k = block_k or _block_k(group_size)
    if group_size % block_k:
        raise ValueError(f"block_k {block_k} must divide the group size {group_size}")
    groups = k // group_size
    if splits is None:
        # Split K so that about 4 programs per output block run at once, in whole groups per split.
        splits = max(1, min(groups, 4))
    k_per_split = triton.cdiv(groups, max(1, min(splits, groups))) * group_size
    splits = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(n, block_n), m, splits)
    common = dict(GROUP=group_size, BLOCK_N=block_n, BLOCK_K=block_k, K_PER_SPLIT=k_per_split, num_warps=num_warps)
    if splits == 1:
        # One program per output block: it stores its outputs directly, no zeroing or cast launches.
        out = torch.empty(m, n, device=x.device, dtype=x.dtype)
        _awq_gemv_kernel[grid](
            x, qweight, qzeros, scales, bias if bias is not None else scales, out, n, k, x.stride(0),
            SPLIT=False, HAS_BIAS=bias is not None, **common,
        )
        return out
    acc = torch.zeros(m, n, device=x.device, dtype=torch.float32)
    _awq_gemv_kernel[grid](
        x, qweight, qzeros, scales, scales, acc, n, k, x.stride(0), SPLIT=True, HAS_BIAS=False, **common
    )
    if bias is not None:
        acc += bias.float()
    return acc.to(x.dtype)
