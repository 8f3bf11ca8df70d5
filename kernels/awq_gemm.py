"""Fused dequantize-GEMM for AWQ int4 weights (AutoAWQ "GEMM" layout, see ``awq_reference``).

``y [M, N] = x [M, K] @ W [K, N]`` where ``W`` never exists in memory. Each program loads whole packed
int32 words (eight outputs each, 16-byte vector loads along the word row), shifts the eight nibbles
out in registers, and keeps its outputs in *nibble order*: nibble ``i`` of word ``c`` is output column
``8c + AWQ_ORDER[i]``, so zeros, scales and the final store use that column map and nothing is ever
permuted. Two shapes of launch:

- GEMV (small ``M``, decode), bound by reading the weights: one program per (row, block of words,
  slice of K), products accumulated elementwise and summed over K once. With K split, the slices
  meet in an fp32 buffer through atomic adds; unsplit, a program stores its outputs directly.
- tiled (larger ``M``, prefill): ``BLOCK_M x 8*BLOCK_C`` output tiles, the dequantized ``[BLOCK_K,
  8*BLOCK_C]`` weight tile fed to ``tl.dot``. A K step never straddles a group.

An earlier version loaded one word per output column (each word eight times): the load units, not
memory, bound it, at 76 GB/s on an H200 (a 4096x11008 layer at M=1: 296 us against fp16's 25 us).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._device import num_sms

GEMV_MAX_M = 8  # at or below this many rows the GEMV launch wins (weight-read bound)


@triton.jit
def _nibble_columns(offs_c):
    """``[BLOCK_C, 8]`` output column of each nibble of each word, and ``[8]`` nibble shifts."""
    nib = tl.arange(0, 8)
    # AWQ_ORDER: nibble i holds column (i % 4) * 2 + i // 4 of its block of eight.
    cols = offs_c[:, None] * 8 + ((nib % 4) * 2 + nib // 4)[None, :]
    return cols, nib * 4


@triton.jit
def _nibbles_to_float(words, shifts):
    """The nibbles of ``words`` as exact fp32 values 0..15, without int-to-float conversions.

    ``0x4B000000 | q`` is the bit pattern of the float ``2**23 + q``; one subtraction leaves ``q``.
    Int-to-float conversions issue at a fraction of the FMA rate, one per weight; this is a logic op
    and an add. Its effect was only measured together with deeper K splits (benchmarks/RESULTS.md).
    """
    bits = ((words >> shifts) & 0xF) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _awq_gemv_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr,
    N, K, stride_xm,
    GROUP: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr, K_PER_SPLIT: tl.constexpr,
    SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """SPLIT: add this K slice's sums into the fp32 ``out`` (zeroed by the launcher); otherwise the
    program owns its outputs and stores them (plus the bias) in ``out``'s dtype."""
    pid_c = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    pid_k = tl.program_id(2)
    n8 = N // 8
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < n8
    cols, shifts = _nibble_columns(offs_c)
    acc = tl.zeros((BLOCK_C, 8), dtype=tl.float32)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(k_start + K_PER_SPLIT, K)  # K_PER_SPLIT and K are whole groups
    for g0 in range(k_start, k_end, GROUP):
        g = g0 // GROUP
        zeros = _nibbles_to_float(tl.load(qz_ptr + g * n8 + offs_c, mask=c_mask, other=0)[:, None], shifts[None, :])
        scales = tl.load(s_ptr + g * N + cols, mask=c_mask[:, None], other=0.0).to(tl.float32)
        # Within a group the zero point and scale are constant: sum x*q and x, apply them once.
        xq = tl.zeros((BLOCK_C, 8), dtype=tl.float32)
        xs = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(g0, g0 + GROUP, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + row * stride_xm + offs_k).to(tl.float32)
            words = tl.load(qw_ptr + offs_k[:, None] * n8 + offs_c[None, :], mask=c_mask[None, :], other=0)
            q = _nibbles_to_float(words[:, :, None], shifts[None, None, :])
            xq += tl.sum(q * x[:, None, None], axis=0)
            xs += x
        acc += scales * (xq - zeros * tl.sum(xs, axis=0))
    out = out_ptr + row * N + cols
    if SPLIT:
        tl.atomic_add(out, acc, mask=c_mask[:, None])
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=c_mask[:, None], other=0.0).to(tl.float32)
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=c_mask[:, None])


@triton.jit
def _awq_gemm_kernel(
    x_ptr, qw_ptr, qz_ptr, s_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_om,
    GROUP: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_c = tl.program_id(1)
    BLOCK_N: tl.constexpr = BLOCK_C * 8
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    m_mask = offs_m < M
    c_mask = offs_c < N // 8
    n8 = N // 8
    cols, shifts = _nibble_columns(offs_c)
    cols = tl.reshape(cols, [BLOCK_N])
    n_mask = tl.reshape(tl.broadcast_to(c_mask[:, None], (BLOCK_C, 8)), [BLOCK_N])
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):  # K % BLOCK_K == 0: no K mask
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None], other=0.0)
        words = tl.load(qw_ptr + offs_k[:, None] * n8 + offs_c[None, :], mask=c_mask[None, :], other=0)
        q = tl.reshape(_nibbles_to_float(words[:, :, None], shifts[None, None, :]), [BLOCK_K, BLOCK_N])
        g = k0 // GROUP
        zw = tl.load(qz_ptr + g * n8 + offs_c, mask=c_mask, other=0)
        zeros = tl.reshape(_nibbles_to_float(zw[:, None], shifts[None, :]), [BLOCK_N])
        scales = tl.load(s_ptr + g * N + cols, mask=n_mask, other=0.0).to(tl.float32)
        w = ((q - zeros[None, :]) * scales[None, :]).to(x.dtype)
        if IEEE:
            acc += tl.dot(x, w, input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + offs_m[:, None] * stride_om + cols[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _block_k(group_size: int, largest: int = 64) -> int:
    """Largest power of two <= ``largest`` dividing the group size (tl.dot needs >= 16)."""
    block = largest
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
    gemv_config: dict[str, int] | None = None,  # block_c / block_k / splits / num_warps (benchmarks)
    tiled_config: dict[str, int] | None = None,  # block_m / block_c / block_k / num_warps / num_stages
) -> torch.Tensor:
    """``x [M, K] @ dequant(W) [K, N] (+ bias)`` in ``x.dtype``, accumulating in fp32."""
    _check(x, qweight, qzeros, scales, group_size)
    m = x.shape[0]
    if force == "gemv" or (force is None and m <= GEMV_MAX_M):
        return _gemv(x, qweight, qzeros, scales, group_size, bias, **(gemv_config or {}))
    return _tiled(x, qweight, qzeros, scales, group_size, bias, **(tiled_config or {}))


def _gemv(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    block_c: int = 16,
    block_k: int | None = None,
    splits: int | None = None,
    num_warps: int = 4,
) -> torch.Tensor:
    m, k = x.shape
    n = scales.shape[1]
    block_k = block_k or _block_k(group_size, 32)
    if group_size % block_k:
        raise ValueError(f"block_k {block_k} must divide the group size {group_size}")
    groups = k // group_size
    if splits is None:
        # Each program is latency-bound: split K (down to one group per slice) until about 32
        # programs per SM are in flight (H200, 4096x11008 at M=1, block_c 16, block_k 32: K in 4
        # slices 35.6 us, 8: 26.2, 16: 24.6, 32: 23.3).
        programs = triton.cdiv(n // 8, block_c) * m
        splits = triton.cdiv(32 * num_sms(x.device), programs)
    k_per_split = triton.cdiv(groups, max(1, min(splits, groups))) * group_size
    splits = triton.cdiv(k, k_per_split)
    grid = (triton.cdiv(n // 8, block_c), m, splits)
    common = dict(GROUP=group_size, BLOCK_C=block_c, BLOCK_K=block_k, K_PER_SPLIT=k_per_split, num_warps=num_warps)
    if splits == 1:
        # One program per block of outputs: it stores them directly, no zeroing or cast launches.
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


def _tiled(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    block_m: int | None = None,
    block_c: int | None = None,
    block_k: int | None = None,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    m, k = x.shape
    n = scales.shape[1]
    block_k = block_k or _block_k(group_size)
    if group_size % block_k or block_k < 16:
        raise ValueError(f"block_k {block_k} must be >= 16 and divide the group size {group_size}")
    block_m = block_m or (16 if m <= 16 else (32 if m <= 32 else 64))
    block_c = block_c or (8 if n <= 2048 or m <= 32 else 16)
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(m, block_m), triton.cdiv(n // 8, block_c))
    _awq_gemm_kernel[grid](
        x, qweight, qzeros, scales, bias if bias is not None else scales, out,
        m, n, k, x.stride(0), out.stride(0),
        GROUP=group_size, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    return out
