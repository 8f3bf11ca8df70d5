#!/usr/bin/env bash
# One lease of a GPU machine, as one script: install the tree, run the kernel and CUDA-graph tests
# compiled (not interpreted), then the 1.1B decode step by kernel variant (issue 6's open bar) and the
# projections' GEMVs (matmul_probe: one by one, and a layer's chain), then the AWQ GEMM (issue 7's bar,
# met: 2.70x) and the other diagnostics. Each step has a time limit and its own log under OUT; a failing
# step does not stop the others. The fourth H200 session's first call ran all six steps, with limits cut
# to 560 s, in 234 s. The default steps are kernel_tests decode_step matmul_probe (450 s of limits);
# STEPS="awq_bench decode_sweep kernels_bench" runs the rest. The benchmarks print a JSON line per
# finished part, so a step cut short keeps what it measured.
#
#   bash benchmarks/gpu_session.sh [OUT_DIR]     (on the GPU machine, from the repo root)
set -u
OUT_DIR=${1:-${OUT:-/tmp/leanserve-gpu}}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}

{
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
    $PY -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
    nproc
} > "$OUT_DIR/env.txt" 2>&1
cat "$OUT_DIR/env.txt"

# The machine has torch/triton/transformers but not our other dependencies; the kernel, model and
# engine code needs none of them.
if ! $PY -m pip install -q --no-deps --no-build-isolation -e . > "$OUT_DIR/pip.log" 2>&1; then
    echo "editable install failed (see pip.log); using PYTHONPATH"
    ln -sfn ../../kernels src/leanserve/kernels
    export PYTHONPATH="$PWD/src"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # tests import their helpers as tests.<dir>.<module>

# A subset reruns only those; ncu is not in the default (a 9th log would not come back from $OUT).
STEPS=${STEPS:-kernel_tests decode_step matmul_probe}
step() {
    local name=$1 limit=$2
    shift 2
    case " $STEPS " in *" $name "*) ;; *) return ;; esac
    local start=$SECONDS
    timeout "$limit" "$@" > "$OUT_DIR/$name.log" 2>&1
    local rc=$?
    echo "=== $name: rc=$rc in $((SECONDS - start)) s"
    tail -n "${TAIL_LINES:-30}" "$OUT_DIR/$name.log"
}

# TESTS narrows the compiled tests (pytest node ids or paths) for a follow-up call.
TESTS=${TESTS:-tests/kernels tests/model/test_cuda_graphs.py tests/model/test_llama_fused_decode.py tests/quant/test_awq_quantize.py::test_awq_checkpoint_on_cuda_takes_the_k_major_gemv_in_fp16}
# shellcheck disable=SC2086
step kernel_tests "${T_TESTS:-150}" $PY -m pytest -q -n 8 --maxfail=20 -p no:cacheprovider $TESTS
# The decode step by variant: the model's own ops (PDL, the 1-row GEMV with the gating and residual
# fusions), the same without the 1-row layer fusions, cuBLAS + PDL, and the same model with AWQ int4
# projections in fp16 (the K-major int4 GEMV; untimed in a whole model). decode_step.py lists the others
# (rotary_apart, persistent, gate_apart, residual_apart: timed in the fourth H200 session; fused, unfused:
# the first). The L2 prefetch of the next weights, timed in the fifth H200 session, lost and was removed.
step decode_step "${T_DECODE:-200}" $PY benchmarks/decode_step.py --iters 30 --batches "${DECODE_BATCHES:-1,8,32,64}" \
    --variants "${DECODE_VARIANTS:-gemv_pdl,layer_apart,fused_pdl,awq_int4}" --profile-host
# The int4 GEMV sweep at M=1 only by default (the bar); AWQ_SWEEP_M adds the K-major GEMV at 2/4/6/8 rows,
# the dequantize kernels alone at 16 and the tiled GEMM at 16/64/256.
step awq_bench "${T_AWQ:-150}" $PY benchmarks/quant.py --gpu-only ${AWQ_SWEEP:---sweep} --sweep-m ${AWQ_SWEEP_M:-1}
# The decode attention inside a 1.1B model's graph, by the minimum partition length (MIN_PARTITION_TOKENS).
step decode_sweep "${T_SWEEP:-60}" $PY benchmarks/kernels.py --decode-graph-sweep --iters 30 --warmup 5
# Where the projections lose (matmul_probe: cuBLAS vs the Triton GEMV on the 1.1B model's projections, PDL
# off/on, a dependent layer chain, a launch sweep), and the attention kernels.
step matmul_probe "${T_PROBE:-100}" $PY benchmarks/decode_step.py --matmul-probe
step kernels_bench "${T_KERNELS:-60}" $PY benchmarks/kernels.py --iters 50 --warmup 10
# Not in the default steps: the AWQ GEMV's loads alone (is the grid or the arithmetic the limit?), and
# Nsight Compute's counters for the kernels that stay far from copy bandwidth (benchmarks/ncu_targets.py;
# the stall reasons per issued instruction come from the --metrics regex).
step awq_probe "${T_AWQ_PROBE:-60}" $PY benchmarks/awq_probe.py
NCU=$(command -v ncu || echo /usr/local/cuda/bin/ncu)
step ncu "${T_NCU:-120}" "$NCU" --profile-from-start off --clock-control none --section SpeedOfLight \
    --section Occupancy --section LaunchStats --section WarpStateStats --section SchedulerStats \
    --section MemoryWorkloadAnalysis --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    $PY benchmarks/ncu_targets.py
