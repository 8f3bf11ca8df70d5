"""Plain-torch AWQ "GEMM"-format int4: unpack, dequantize, and the dequantize-then-matmul reference.

The layout is AutoAWQ's: for a linear with ``K`` inputs and ``N`` outputs,

- ``qweight`` int32 ``[K, N / 8]``: eight 4-bit weights per word, along the output dimension;
- ``qzeros``  int32 ``[K / group, N / 8]``: the integer zero point of each group, packed the same way;
- ``scales``  fp16  ``[K / group, N]``;

and ``w[k, n] = (q[k, n] - z[k // group, n]) * s[k // group, n]``. Inside a word the eight columns are
not in order: nibble ``i`` (bits ``4i .. 4i+3``) holds column ``AWQ_ORDER[i]`` of its block of eight.
This module imports nothing from leanserve (``kernels/`` stands alone) and is the ground truth the
Triton kernel and the CPU int4 path are tested against.
"""

from __future__ import annotations

import torch

# Nibble i of a packed word holds column AWQ_ORDER[i] of its 8-column block ...
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
# ... so column j of the block sits in nibble AWQ_NIBBLE_OF_COLUMN[j] (the inverse permutation).
AWQ_NIBBLE_OF_COLUMN = (0, 4, 1, 5, 2, 6, 3, 7)


def unpack_awq(packed: torch.Tensor) -> torch.Tensor:
    """int32 ``[R, C / 8]`` -> uint8 ``[R, C]`` of values 0..15, columns in natural order."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed AWQ tensors are int32, got {packed.dtype}")
    # AWQ_NIBBLE_OF_COLUMN[j] = 4 * (j % 2) + j // 2, built on the device: no host copy, so the reference
    # can run inside a CUDA graph capture.
    columns = torch.arange(8, dtype=torch.int32, device=packed.device)
    shifts = 4 * (4 * (columns % 2) + columns // 2)
    # Arithmetic right shift of a negative word smears the sign bit, but the & 0xF drops it again.
    values = (packed.unsqueeze(-1) >> shifts) & 0xF
    return values.reshape(packed.shape[0], packed.shape[1] * 8).to(torch.uint8)


def pack_awq(values: torch.Tensor) -> torch.Tensor:
    """Values 0..15 ``[R, C]`` (C a multiple of 8) -> int32 ``[R, C / 8]`` in AWQ's nibble order."""
    rows, cols = values.shape
    if cols % 8:
        raise ValueError(f"AWQ packs 8 values per int32 word along dim 1; {cols} is not a multiple of 8")
    v = values.to(torch.int64).reshape(rows, cols // 8, 8)
    if v.numel() and (v.min() < 0 or v.max() > 15):
        raise ValueError("int4 values must lie in 0..15")
    shifts = 4 * torch.arange(8, dtype=torch.int64, device=values.device)
    order = torch.tensor(AWQ_ORDER, device=values.device)
    words = (v[..., order] << shifts).sum(-1)  # nibble i <- column AWQ_ORDER[i]; disjoint bits, so + == |
    # Reinterpret as signed 32-bit: words >= 2^31 (nibble 7 >= 8) become negative, as AutoAWQ stores them.
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


def dequantize_awq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The dense weight ``[K, N]`` (input-major, as AWQ stores it) in ``dtype``."""
    q = unpack_awq(qweight).to(dtype)
    z = unpack_awq(qzeros).to(dtype).repeat_interleave(group_size, dim=0)
    s = scales.to(dtype).repeat_interleave(group_size, dim=0)
    return (q - z) * s


def awq_gemm_reference(
    x: torch.Tensor,
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x [..., K] @ W [K, N] (+ bias)``, dequantizing in fp32 first; output in ``x.dtype``."""
    w = dequantize_awq(qweight, qzeros, scales, group_size, torch.float32)
    out = x.float() @ w
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def random_awq(
    k: int, n: int, group: int, seed: int | torch.Generator = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A random ``K x N`` layer in this format, ``(qweight, qzeros, scales)`` on the CPU, scales in
    [0.001, 0.021) (for tests and benchmarks; ``seed`` may be a generator that several layers share)."""
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    q = torch.randint(0, 16, (k, n), generator=gen)
    z = torch.randint(0, 16, (k // group, n), generator=gen)
    s = (torch.rand(k // group, n, generator=gen) * 0.02 + 0.001).half()
    return pack_awq(q), pack_awq(z), s


# K-major int4: the layout the int4 GEMV (int4_gemv.py) reads, made from AWQ's once at load. Each output
# row's inputs are contiguous, as in nn.Linear, in chunks of K_MAJOR_CHUNK inputs: four int32 words, one
# 16-byte vector. Nibble j + 4h of word s of chunk c (j < 4, h < 2) holds input 32c + 8j + 2s + h: the
# unpack yields nibbles j and j + 4 as one pair, and their inputs are then adjacent in x, so the x pairs
# a thread needs for pair j of its four words are 8 consecutive inputs, one 16-byte load.
K_MAJOR_CHUNK = 32


def repack_k_major(
    qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """AWQ's ``(qweight, qzeros, scales)`` for ``W [K, N]`` -> ``(words, factors)``:

    - ``words`` int32 ``[N, K / 8]`` in the chunk order above;
    - ``factors`` int32 ``[N, K / group]``: per output and group, fp16 ``16 * scale`` in the low half and
      fp16 ``1 + zero / 16`` in the high half (both exact), what the kernel needs to turn its unpacked
      ``1 + q / 16`` into ``(q - zero) * scale``.

    Runs on the tensors' device with plain torch; takes ~2 bytes of scratch per weight.
    """
    k, n8 = qweight.shape
    n = n8 * 8
    if k % K_MAJOR_CHUNK or group_size % K_MAJOR_CHUNK or k % group_size:
        raise ValueError(f"K ({k}) and the group size ({group_size}) must be multiples of {K_MAJOR_CHUNK}, "
                         "K of the group size")
    q = unpack_awq(qweight).T.reshape(n, k // K_MAJOR_CHUNK, 4, 4, 2)  # [n, chunk c, pair j, word s, half h]
    words = torch.zeros(n, k // K_MAJOR_CHUNK, 4, dtype=torch.int64, device=qweight.device)
    for j in range(4):
        for h in range(2):
            words |= q[:, :, j, :, h].to(torch.int64) << (4 * (j + 4 * h))
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32).reshape(n, k // 8)
    a = scales.float() * 16
    if not torch.isfinite(a.half()).all():
        raise ValueError("AWQ scales too large to keep 16 * scale in fp16")
    z = 1 + unpack_awq(qzeros).float() / 16
    low = a.half().view(torch.int16).to(torch.int32) & 0xFFFF
    high = z.half().view(torch.int16).to(torch.int32) << 16
    return words, (low | high).T.contiguous()


def dequantize_k_major(words: torch.Tensor, factors: torch.Tensor, group_size: int) -> torch.Tensor:
    """The dense ``W^T [N, K]`` (output-major) in fp32 from ``repack_k_major``'s tensors."""
    n, k8 = words.shape
    shifts = 4 * torch.arange(8, dtype=torch.int32, device=words.device)
    nibbles = (words.view(n, k8 // 4, 4, 1) >> shifts) & 0xF  # [n, chunk, word s, nibble j + 4h]
    q = nibbles.view(n, k8 // 4, 4, 2, 4).permute(0, 1, 4, 2, 3).reshape(n, k8 * 8).float()  # input 32c + 8j + 2s + h
    a = (factors & 0xFFFF).to(torch.int16).view(torch.float16).float().repeat_interleave(group_size, dim=1)
    z = (factors >> 16).to(torch.int16).view(torch.float16).float().repeat_interleave(group_size, dim=1)
    return (1 + q / 16 - z) * a
