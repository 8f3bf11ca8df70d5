"""Triton RMSNorm (optionally fused with the residual add), rotary embedding and SiLU-and-multiply.

A decode step of a small model on a GPU is a long chain of small kernels. Unfused, the residual add
plus RMSNorm is two to six launches, the rotary embedding of q and k about twenty (gathers, casts,
four products, two sums, a concat, a cast, twice) and the MLP's gating two; each of these does it in
one launch. Semantics are those of ``reference.rms_norm`` / ``apply_rotary`` / ``silu_and_mul``;
everything is computed in fp32. On sm_90+ (unless ``LEANSERVE_PDL=0``) they are launched with programmatic
dependent launch (``_pdl.py``): the norm loads its weight before waiting on the kernel before it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _checks
from ._device import pdl_enabled
from ._pdl import pdl_launch, pdl_launch_dependents, pdl_wait


@triton.jit
def _rms_norm_kernel(
    x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr,
    n_cols, eps, stride_x, stride_res, stride_out, stride_res_out,
    HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)  # a weight: no kernel writes it
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        total = (x.to(tl.float32) + tl.load(res_ptr + row * stride_res + offs, mask=mask, other=0.0).to(tl.float32))
        # Rounded to the activation dtype first, as the unfused add would leave it.
        x = total.to(res_out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / n_cols + eps)
    tl.store(out_ptr + row * stride_out + offs, (xf * rstd * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Triton ``reference.rms_norm``: one program per row of ``x [..., hidden]``."""
    if x.dim() != 2:  # leading dims flattened (a view when they can be)
        lead = x.shape[:-1]
        flat = rms_norm(x.reshape(-1, x.shape[-1]), weight, eps,
                        None if residual is None else residual.reshape(-1, x.shape[-1]))
        if residual is None:
            return flat.view(*lead, x.shape[-1])
        return flat[0].view(*lead, x.shape[-1]), flat[1].view(*lead, x.shape[-1])
    _checks.check_float("x", x, 2)
    _checks.check_float("weight", weight, 1)
    n_rows, n_cols = x.shape
    if weight.shape[0] != n_cols:
        _checks.fail(f"weight has {weight.shape[0]} entries, x rows {n_cols}")
    if residual is not None:
        _checks.check_float("residual", residual, 2)
        if residual.shape != x.shape:
            _checks.fail(f"residual {tuple(residual.shape)} must match x {tuple(x.shape)}")
        _checks.check_same_device(x=x, weight=weight, residual=residual)
    else:
        _checks.check_same_device(x=x, weight=weight)
    out = torch.empty_like(x, memory_format=torch.contiguous_format)
    res_out = torch.empty_like(out) if residual is not None else out
    res_in = residual if residual is not None else x
    if n_rows:
        _rms_norm_kernel[(n_rows,)](
            x, res_in, weight, out, res_out,
            n_cols, eps, x.stride(0), res_in.stride(0), out.stride(0), res_out.stride(0),
            HAS_RESIDUAL=residual is not None, BLOCK=triton.next_power_of_2(n_cols),
            num_warps=4 if n_cols <= 4096 else 8, **pdl_launch(pdl_enabled(x.device)),
        )
    return out if residual is None else (out, res_out)


@triton.jit
def _rotary_row(pos_ptr, token, cos_ptr, sin_ptr, stride_cos, max_position,
                HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """The ``cos``/``sin`` rows ``[BLOCK_HALF]`` (fp32) of ``token``'s position."""
    # Clamped: a bad position reads a wrong row, never foreign memory (the launchers check values).
    pos = tl.minimum(tl.maximum(tl.load(pos_ptr + token), 0), max_position - 1).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_ptr + pos * stride_cos + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + pos * stride_cos + offs_d, mask=offs_d < HALF, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotated_heads(base, row, cos, sin, stride_t, stride_h, n_heads,
                   BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token's heads ``[BLOCK_H, BLOCK_HALF]``, rotated in fp32 and rounded to their dtype: the
    pointers of their first halves, the mask, and the two rotated halves (nothing stored)."""
    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_HALF)
    mask = (offs_h[:, None] < n_heads) & (offs_d[None, :] < HALF)
    ptr = base + row * stride_t + offs_h[:, None] * stride_h + offs_d[None, :]
    x1 = tl.load(ptr, mask=mask, other=0.0)
    x2 = tl.load(ptr + HALF, mask=mask, other=0.0)
    a, b = x1.to(tl.float32), x2.to(tl.float32)
    r1 = (a * cos[None, :] - b * sin[None, :]).to(x1.dtype)
    r2 = (b * cos[None, :] + a * sin[None, :]).to(x1.dtype)
    return ptr, mask, r1, r2


@triton.jit
def _rotate_heads(base, row, cos, sin, stride_t, stride_h, n_heads,
                  BLOCK_H: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr):
    ptr, mask, r1, r2 = _rotated_heads(base, row, cos, sin, stride_t, stride_h, n_heads, BLOCK_H, HALF, BLOCK_HALF)
    tl.store(ptr, r1, mask=mask)
    tl.store(ptr + HALF, r2, mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_ptr, sin_ptr,
    n_heads, n_kv_heads, max_position,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cos,
    BLOCK_H: tl.constexpr, BLOCK_KVH: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    # The cos/sin rows depend on the positions, which a kernel may have written: nothing to prefetch.
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    cos, sin = _rotary_row(pos_ptr, token, cos_ptr, sin_ptr, stride_cos, max_position, HALF, BLOCK_HALF)
    _rotate_heads(q_ptr, token, cos, sin, stride_qt, stride_qh, n_heads, BLOCK_H, HALF, BLOCK_HALF)
    _rotate_heads(k_ptr, token, cos, sin, stride_kt, stride_kh, n_kv_heads, BLOCK_KVH, HALF, BLOCK_HALF)


def check_rotary_args(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> None:
    """The launch checks of the rotary kernels (this one and ``kv_cache.write_kv_cache_rotary``)."""
    _checks.check_float("query", query, 3)
    _checks.check_float("key", key, 3)
    _checks.check_index("positions", positions, 1, (torch.int64, torch.int32))
    for name, t in (("cos", cos), ("sin", sin)):
        if t.dim() != 2 or t.dtype != torch.float32 or t.stride(-1) != 1:
            _checks.fail(f"{name} must be a [max_position, head_dim // 2] fp32 table, got {t.dtype} {tuple(t.shape)}")
    n_tokens, n_heads, head_dim = query.shape
    if key.shape[0] != n_tokens or key.shape[2] != head_dim or positions.shape[0] != n_tokens:
        _checks.fail(
            f"query {tuple(query.shape)}, key {tuple(key.shape)} and positions {tuple(positions.shape)} disagree"
        )
    if head_dim % 2 or cos.shape[1] != head_dim // 2 or sin.shape != cos.shape or cos.stride() != sin.stride():
        _checks.fail(f"head_dim {head_dim} needs even size and cos/sin tables of {head_dim // 2} columns")
    _checks.check_same_device(query=query, key=key, positions=positions, cos=cos, sin=sin)
    if n_tokens and _checks.value_checks_enabled() and not _checks.already_validated(
        "rotary", (positions,), (cos.shape[0],)
    ):
        _checks.raise_if(
            ((positions < 0) | (positions >= cos.shape[0])).any(),
            lambda: f"positions must lie in [0, {cos.shape[0]}), got {positions[:8].tolist()}",
        )
        _checks.remember_validated("rotary", (positions,), (cos.shape[0],))


def apply_rotary(
    query: torch.Tensor, key: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton ``reference.apply_rotary``, in place: ``query``/``key`` may be strided views (e.g. of a
    fused QKV output) whose last dim is contiguous; they are returned rotated."""
    check_rotary_args(query, key, positions, cos, sin)
    n_tokens, n_heads, head_dim = query.shape
    if n_tokens == 0:
        return query, key
    half = head_dim // 2
    _rotary_kernel[(n_tokens,)](
        query, key, positions, cos, sin, n_heads, key.shape[1], cos.shape[0],
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos.stride(0),
        BLOCK_H=triton.next_power_of_2(n_heads), BLOCK_KVH=triton.next_power_of_2(key.shape[1]),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), num_warps=4, **pdl_launch(pdl_enabled(query.device)),
    )
    return query, key


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_wait(USE_PDL)
    pdl_launch_dependents(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_cols
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + n_cols + offs, mask=mask, other=0.0).to(tl.float32)
    g = gate.to(tl.float32)
    # Rounded like the unfused ops: silu(gate) in the activation dtype, then the product.
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (silu * up).to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """Triton ``reference.silu_and_mul``: ``x [T, 2 * I]`` (gate then up) -> ``silu(gate) * up [T, I]``."""
    _checks.check_float("x", x, 2)
    n_rows, width = x.shape
    if width % 2:
        _checks.fail(f"x must hold gate and up halves, got an odd width {width}")
    n_cols = width // 2
    out = torch.empty(n_rows, n_cols, dtype=x.dtype, device=x.device)
    if n_rows:
        block = min(1024, triton.next_power_of_2(n_cols))
        _silu_and_mul_kernel[(n_rows, triton.cdiv(n_cols, block))](
            x, out, n_cols, x.stride(0), out.stride(0), BLOCK=block, num_warps=4,
            **pdl_launch(pdl_enabled(x.device)),
        )
    return out
