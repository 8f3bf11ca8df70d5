"""Plot the GPU figures recorded in benchmarks/results/ (no GPU needed).

    python benchmarks/plot_gpu.py [--results benchmarks/results] [--out benchmarks/results/gpu.png]

Reads the JSON lines that ``decode_step.py`` and ``quant.py --gpu-only`` printed on the card
(``h200_decode_step.json``, ``h200_awq.json``, the second to fourth sessions' ``h200_b_*.json``,
``h200_c_*.json``, ``h200_d_*.json`` and ``h200_e_*.json``) and draws: the
1.1B decode step against its weight-read floor (fused and unfused layer ops under CUDA graphs, then
PDL and the 1-row GEMV, the full runner step, and the same model with AWQ int4 projections), and the
AWQ INT4 GEMM against fp16
``torch.matmul`` by batch rows.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=HERE / "results")
    p.add_argument("--out", type=Path, default=HERE / "results" / "gpu.png")
    args = p.parse_args()
    step = json.loads((args.results / "h200_decode_step.json").read_text())
    awq = json.loads((args.results / "h200_awq.json").read_text())
    # The second session: PDL and the 1-row GEMV (the defaults now), and the v4 AWQ GEMV.
    routed = json.loads((args.results / "h200_b_decode_routed.json").read_text())["gemv_pdl"]["rows"]
    awq_b = json.loads((args.results / "h200_b_awq.json").read_text())
    # The third: the reduce kernel with 128-key partitions, and the v5 AWQ GEMV.
    step_c = json.loads((args.results / "h200_c_decode_step.json").read_text())["gemv_pdl"]["rows"]
    awq_c = json.loads((args.results / "h200_c_awq.json").read_text())
    # The fourth: the norm fold dropped; AWQ served through the K-major int4 GEMV.
    step_d = json.loads((args.results / "h200_d_decode_step.json").read_text())["gemv_pdl"]["rows"]
    awq_d = json.loads((args.results / "h200_d_awq.json").read_text())
    # The fifth: the whole model with AWQ int4 projections (fp16, the K-major GEMV).
    step_int4 = json.loads((args.results / "h200_e_decode_step.json").read_text())["awq_int4"]["rows"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 7))
    fused, unfused = step["fused"]["rows"], step["unfused"]["rows"]
    batches = [r["batch"] for r in fused]
    left.plot(batches, [r["floor_ms"] for r in fused], "k--", label="floor: weights + K/V at copy bandwidth")
    left.plot(batches, [r["graph_ms"] for r in fused], "o-", label="CUDA graph, fused Triton layer ops")
    left.plot(batches, [r["graph_ms"] for r in unfused], "s-", label="CUDA graph, unfused torch ops")
    left.plot([r["batch"] for r in routed], [r["graph_ms"] for r in routed], "D-",
              label="CUDA graph, + PDL and 1-row Triton GEMV (2nd session)")
    left.plot([r["batch"] for r in step_c], [r["graph_ms"] for r in step_c], "P-",
              label="CUDA graph, + split-KV reduce kernel, 128-key partitions (3rd session)")
    left.plot([r["batch"] for r in step_d], [r["graph_ms"] for r in step_d], "X-",
              label="CUDA graph, + gating / residual in the 1-row GEMVs (4th session)")
    left.plot(batches, [r["step_ms"] for r in fused], "^-",
              label="runner step, 1st session (graph + logits + sampling)")
    left.plot([r["batch"] for r in step_d], [r["step_ms"] for r in step_d], "v-", label="runner step, 4th session")
    left.plot(batches, [1.5 * r["floor_ms"] for r in fused], ":", color="grey", label="bar: 1.5x floor")
    left.plot([r["batch"] for r in step_int4], [r["graph_ms"] for r in step_int4], "*-", color="tab:cyan",
              label="CUDA graph, AWQ int4 projections, fp16 (5th session)")
    left.plot([r["batch"] for r in step_int4], [r["floor_ms"] for r in step_int4], "--", color="tab:cyan",
              label="floor of the int4 model (0.65 GB read per step)")
    left.set_xscale("log", base=2)
    left.set_xlabel("decode batch (sequences, 512-token contexts)")
    left.set_ylabel("ms per step")
    left.set_ylim(bottom=0)
    left.set_title(f"1.1B Llama decode step, {step['device']}, bf16")
    left.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.14))

    ms = [1, 16, 64, 256]
    x = range(len(ms))
    width = 0.16
    right.bar([i - 2 * width for i in x], [awq[f"gemm_us_awq_m{m}"] for m in ms], width,
              label="AWQ INT4 (Triton), 1st session")
    right.bar([i - width for i in x], [awq_b[f"gemm_us_awq_m{m}"] for m in ms], width,
              label="AWQ INT4, 2nd session (v4 GEMV, dequantize + matmul from 32 rows)")
    right.bar(list(x), [awq_c[f"gemm_us_awq_m{m}"] for m in ms], width, label="AWQ INT4, 3rd session (v5 GEMV)")
    right.bar([i + width for i in x], [awq_d[f"gemm_us_int4_m{m}"] for m in ms], width,
              label="INT4 served, 4th session (K-major GEMV, fp16 pairs; dequantize + matmul from 7 rows)")
    right.bar([i + 2 * width for i in x], [awq[f"gemm_us_fp16_m{m}"] for m in ms], width, label="fp16 torch.matmul")
    right.axhline(awq["gemm_us_fp16_m1"] / 2.5, color="grey", ls=":", label="bar at M=1: 2.5x faster than fp16")
    right.set_xticks(list(x), [f"M={m}" for m in ms])
    right.set_ylabel("us per call (in a CUDA graph, weights rotated out of L2)")
    right.set_title(f"AWQ GEMM {awq['gemm_k']}x{awq['gemm_n']}, group 128")
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
