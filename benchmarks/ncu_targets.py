"""The kernels worth a hardware-counter look, each launched once inside a profiler range, for Nsight
Compute: the AWQ GEMV and its load-only twin (benchmarks/awq_probe.py), the K-major int4 GEMV (fp32 and
half2 math), fp16 matmul at the same shape,
the batch-1 decode attention of a 1.1B model's graph (512 keys in a 2048-token table), and the Triton
GEMV on its qkv projection.

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats --section MemoryWorkloadAnalysis python benchmarks/ncu_targets.py

With ``NCU_AWQ_GEMV_CONFIGS`` (a JSON list of ``gemv_config`` dicts) set, only those AWQ GEMV launches
and the load-only twin of the default launch. Every kernel runs once before the range (compilation, autotuning
and workspaces stay out of it).
"""

from __future__ import annotations

import json
import os
import sys

import torch


def main() -> int:
    if not torch.cuda.is_available():
        print("benchmarks/ncu_targets.py: no CUDA device, nothing to profile.")
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    from awq_probe import DEFAULT_TWIN, load_only
    from leanserve.kernels import backend
    from leanserve.kernels.awq_gemm import awq_gemm
    from leanserve.kernels.gemv import GemvConfig, gemv
    from leanserve.kernels.int4_gemv import Int4GemvConfig, KMajorInt4, int4_gemv
    from quant import random_awq_layers

    k, n, group = 4096, 11008, 128
    (q, z, s), = random_awq_layers(k, n, group, 1)
    kmajor = KMajorInt4.from_awq(q, z, s, group)
    x = torch.randn(1, k, dtype=torch.float16, device="cuda")
    dense = torch.randn(k, n, dtype=torch.float16, device="cuda")
    out = torch.empty(1 << 16, dtype=torch.int32, device="cuda")

    ops = backend.get_attention_ops(torch.device("cuda"))
    blocks = 2048 // 16
    k_cache = torch.randn(blocks, 16, 4, 64, dtype=torch.bfloat16, device="cuda")
    v_cache = torch.randn_like(k_cache)
    table = torch.randperm(blocks, device="cuda", dtype=torch.int32)[None]
    lens = torch.tensor([512], dtype=torch.int32, device="cuda")
    query = torch.randn(1, 32, 64, dtype=torch.bfloat16, device="cuda")
    w_qkv = torch.randn(2560, 2048, dtype=torch.bfloat16, device="cuda")
    h = torch.randn(1, 2048, dtype=torch.bfloat16, device="cuda")

    targets = {
        "awq_gemv": lambda: awq_gemm(x, q, z, s, group),
        "kmajor_gemv_fp32": lambda: int4_gemv(x, kmajor, config=Int4GemvConfig(pdl=False, math="fp32")),
        "kmajor_gemv_half2": lambda: int4_gemv(x, kmajor, config=Int4GemvConfig(pdl=False, math="half2")),
        "load_only": lambda: load_only(q, out, group, **DEFAULT_TWIN),
        "fp16_matmul": lambda: torch.matmul(x, dense),
        "decode_attention_b1": lambda: ops.paged_decode_attention(query, k_cache, v_cache, table, lens, 0.125, 2048),
        "gemv_qkv": lambda: gemv(h, w_qkv, config=GemvConfig(pdl=False)),
    }
    if configs := os.environ.get("NCU_AWQ_GEMV_CONFIGS"):
        # Only these AWQ GEMV launch configs (a JSON list of gemv_config dicts) and the default's load-only twin.
        targets = {f"awq_gemv {cfg}": lambda cfg=cfg: awq_gemm(x, q, z, s, group, force="gemv", gemv_config=cfg)
                   for cfg in json.loads(configs)}
        targets["load_only"] = lambda: load_only(q, out, group, **DEFAULT_TWIN)
    for fn in targets.values():
        fn()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for name, fn in targets.items():
        torch.cuda.nvtx.range_push(name)
        fn()
        torch.cuda.synchronize()
        torch.cuda.nvtx.range_pop()
    torch.cuda.profiler.stop()
    print("profiled:", ", ".join(targets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
