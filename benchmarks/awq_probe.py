"""Where the AWQ GEMV's time goes on a GPU: the same loads with no arithmetic, against the kernel.

The AWQ GEMV (``kernels/awq_gemm.py``) reached a quarter of copy bandwidth at best in the second H200
sweep (21.5 us at 4096x11008; 34 configs from 21.5 to 50 us) and a third in the third (16.1 us). This
probe separates the access pattern from the arithmetic: a load-only kernel walks the packed weight
with the GEMV's grid (one program per block of words and slice of K, ``[BLOCK_K, BLOCK_C]`` word
tiles, loaded straight to registers or through a ``tl.range`` cp.async ring) and only XORs the words
together. If it is as slow as the GEMV, the grid and loads are the limit; if it streams near copy
bandwidth, the arithmetic or the split-K epilogue is. ``DEFAULT_TWIN`` is the GEMV's default launch.

    python benchmarks/awq_probe.py        (needs CUDA; prints a table and a JSON line)
"""

from __future__ import annotations

import json
import sys

import torch
import triton
import triton.language as tl
from gpu_timing import copy_gbps, graph_us


@triton.jit
def _load_only_kernel(qw_ptr, out_ptr, n8, K_PER_SPLIT: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK_C: tl.constexpr, NUM_STAGES: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < n8
    acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.int32)
    k_start = pid_k * K_PER_SPLIT
    for k0 in tl.range(k_start, k_start + K_PER_SPLIT, BLOCK_K, num_stages=NUM_STAGES):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        acc ^= tl.load(qw_ptr + offs_k[:, None] * n8 + offs_c[None, :], mask=c_mask[None, :], other=0)
    # One word per program, so the loads cannot be dropped as dead code.
    tl.store(out_ptr + pid_k * tl.num_programs(0) + pid_c, tl.xor_sum(tl.xor_sum(acc, 0), 0))


# The load-only twin of the GEMV's default launch: one group per slice, a [128, 32] tile, loads straight
# to registers, one warp (kernels/awq_gemm.py _gemv).
DEFAULT_TWIN = dict(block_k=128, block_c=32, num_stages=1, num_warps=1)


def load_only(qweight: torch.Tensor, out: torch.Tensor, k_per_split: int, block_k: int, block_c: int,
              num_stages: int, num_warps: int) -> torch.Tensor:
    k, n8 = qweight.shape
    grid = (triton.cdiv(n8, block_c), k // k_per_split)
    _load_only_kernel[grid](qweight, out, n8, K_PER_SPLIT=k_per_split, BLOCK_K=block_k, BLOCK_C=block_c,
                            NUM_STAGES=num_stages, num_warps=num_warps)
    return out


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/awq_probe.py: no CUDA device, nothing to probe.")
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    from leanserve.kernels.awq_gemm import awq_gemm
    from quant import random_awq_layers

    k, n, group, copies = 4096, 11008, 128, 8
    layers = random_awq_layers(k, n, group, copies)
    int4_bytes = layers[0][0].numel() * 4
    bandwidth = copy_gbps()
    out = torch.empty(1 << 16, dtype=torch.int32, device="cuda")
    x = torch.randn(1, k, dtype=torch.float16, device="cuda")
    rows = []

    def record(name: str, us: float) -> None:
        gbps = int4_bytes / us / 1e3
        rows.append(dict(name=name, us=us, gbps=gbps, pct_of_copy=100 * gbps / bandwidth))
        print(f"  {name:58s} {us:7.1f} us  {gbps:6.0f} GB/s  {100 * gbps / bandwidth:5.1f}% of copy", flush=True)

    print(f"{torch.cuda.get_device_name()}: copy {bandwidth:.0f} GB/s; {k}x{n} int4 weight "
          f"({int4_bytes / 1e6:.1f} MB), one call's share of a graph over {copies} copies")
    record("torch clone of qweight (read + write counted as read)",
           graph_us([lambda q=q: q.clone() for q, _, _ in layers]) / 2)
    record("AWQ GEMV, default launch", graph_us([lambda w=w: awq_gemm(x, *w, group) for w in layers]))
    record("load-only twin of the default launch",
           graph_us([lambda q=q: load_only(q, out, group, **DEFAULT_TWIN) for q, _, _ in layers]))
    sweep_start = len(rows)  # the rows before are the references, not sweep points
    for groups_per_slice in (1, 4):
        for block_k, block_c in ((8, 128), (16, 64), (32, 32), (8, 256), (32, 128), (64, 128), (64, 64)):
            for stages in (1, 2, 3, 4, 6) if block_k * block_c <= 2048 else (1,):
                for warps in (4,) if stages != 3 else (4, 8):
                    if block_k * block_c < 4 * 32 * warps:
                        continue
                    name = f"load-only slice {groups_per_slice * group} tile [{block_k},{block_c}] s{stages} w{warps}"
                    try:
                        t = graph_us([lambda q=q, kps=groups_per_slice * group, bk=block_k, bc=block_c, st=stages,
                                      nw=warps: load_only(q, out, kps, bk, bc, st, nw) for q, _, _ in layers])
                    except Exception as exc:  # a config that does not compile is said and skipped
                        print(f"  {name}: failed ({type(exc).__name__}: {str(exc)[:80]})")
                        continue
                    record(name, t)
    best = min(rows[sweep_start:], key=lambda r: r["us"]) if len(rows) > sweep_start else None
    if best:
        print(f"best load-only: {best['name']} {best['us']:.1f} us ({best['pct_of_copy']:.0f}% of copy)")
    print(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbps": bandwidth, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
