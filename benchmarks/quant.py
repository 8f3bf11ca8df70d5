"""FP32 vs AWQ INT4 vs round-to-nearest INT4 on the embedded model: memory, decode speed, perplexity.

    python benchmarks/quant.py [--quick] [--work-dir DIR] [--data-dir DIR]

Quantizes the embedded SmolLM2-135M twice (AWQ calibrated on the first 80% of Pride and Prejudice, and
plain RTN with the same group size) into --work-dir (reused when already there), then measures:

- weight memory as loaded (the int4 linears' bytes over the same linears at fp16);
- decode tokens/s through our engine, greedy with ignore_eos, at batch 1 and 32 (decode steps only), for
  the FP32 model (exact fp32), the same with its decoder linears in bf16 (``cpu_matmul_dtype``), and INT4;
- perplexity on the held-out last 20% of Pride and Prejudice and on Shakespeare (out of domain);
- with CUDA only: the served int4 path (the K-major GEMV up to a few rows, dequantize + cuBLAS above)
  against an fp16 matmul from M = 1 to 256 on a 4096x11008 layer, beside each launch it chooses between
  and ``awq_gemm``'s on AWQ's own layout (``--gpu-only`` runs just that; ``--sweep`` adds launch configs).

Every figure is printed with the load average beside it (other jobs share the CPU). The last line is
one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

# Before torch: leanserve sets the OpenMP wait policy and spin count the server runs with, and the
# OpenMP runtime reads them once (imported after torch, the decode figures were a spinning-worker
# 9.5 ms/token while the server, with sleeping workers, took 20).
import leanserve  # noqa: E402, F401, I001
import torch  # noqa: E402
from gpu_timing import graph_us  # noqa: E402

from leanserve.engine.config import EngineConfig  # noqa: E402
from leanserve.engine.llm_engine import LLMEngine  # noqa: E402
from leanserve.model.embedded import resolve_model_path  # noqa: E402
from leanserve.model.loader import load_model  # noqa: E402
from leanserve.quant.awq import AWQSettings, calibration_from_text, quantize_model  # noqa: E402
from leanserve.quant.awq_format import write_checkpoint  # noqa: E402
from leanserve.quant.cli import pick_group_size  # noqa: E402
from leanserve.quant.evaluate import DatasetResult, evaluate, weight_memory  # noqa: E402
from leanserve.sampling_params import SamplingParams  # noqa: E402


def load() -> str:
    return "load {:.2f} {:.2f} {:.2f}".format(*os.getloadavg())


def say(label: str, value: str) -> None:
    print(f"{label:<46} {value:<28} [{load()}]", flush=True)


def quantize(
    src: Path, out: Path, method: str, group: int, calib_file: Path, reuse: bool, samples: int
) -> float:
    if reuse and (out / "config.json").exists():
        return 0.0
    shutil.rmtree(out, ignore_errors=True)
    from transformers import AutoTokenizer

    start = time.perf_counter()
    model = load_model(src, torch.device("cpu"), torch.float32, pack_weights=False)  # plain, rewritable
    calib = None
    if method == "awq":
        calib = calibration_from_text(AutoTokenizer.from_pretrained(src), calib_file, samples, 512, end=0.8)
    tensors = quantize_model(model, calib, AWQSettings(group_size=group, method=method))
    write_checkpoint(out, src, tensors, group)
    return time.perf_counter() - start


def decode_speed(
    model_dir: Path, batch: int, new_tokens: int, threads: int, prompt_len: int = 32, matmul_dtype: str = "float32"
) -> tuple[float, float]:
    """(decode tokens/s, ms per decode step) through the engine; prefill steps are not counted.

    Threads are pinned (which turns the engine's thread tuner off) so both models run alike.
    ``matmul_dtype``: the engine's ``cpu_matmul_dtype`` (float32: the exact FP32 model; bfloat16: its
    decoder linears in bf16, the server's default on CPUs with bf16 instructions).
    """
    from leanserve.model.config import ModelConfig

    kv_bytes = ModelConfig.from_pretrained(model_dir).kv_bytes_per_token(4) * batch * (prompt_len + new_tokens + 32)
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory=kv_bytes, max_num_seqs=batch,
                                    device="cpu", num_threads=threads, cpu_matmul_dtype=matmul_dtype))
    g = torch.Generator().manual_seed(0)
    vocab = engine.model_config.vocab_size

    def run(n: int, tokens: int) -> tuple[int, float, int]:
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        for i in range(n):
            engine.add_request(f"{time.monotonic_ns()}-{i}", torch.randint(100, vocab, (prompt_len,),
                                                                         generator=g).tolist(), params)
        decoded, seconds, steps = 0, 0.0, 0
        while engine.has_unfinished_requests():
            engine.step()
            s = engine.last_step
            if s.num_prefill_tokens == 0 and s.num_decode_tokens:
                decoded += s.num_decode_tokens
                seconds += s.step_seconds
                steps += 1
        return decoded, seconds, steps

    run(min(batch, 4), 8)  # warm-up: first-call allocations, thread pool start
    decoded, seconds, steps = run(batch, new_tokens)
    return decoded / seconds, 1000 * seconds / steps


def lm_head_ms(model_dir: Path) -> float:
    """Batch-1 cost of the model's LM head alone, as served (fp32: oneDNN-packed; a quantized model: its int8
    head, see model/llama.py INT8_HEAD_MAX_ROWS), a floor under every decode step."""
    model = load_model(model_dir, torch.device("cpu"), torch.float32)
    h = torch.randn(1, model.config.hidden_size)
    for _ in range(5):
        model.compute_logits(h)
    start = time.perf_counter()
    for _ in range(50):
        model.compute_logits(h)
    return 1000 * (time.perf_counter() - start) / 50


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in fp32 (NaN compares as an error of inf)."""
    err = ((out.float() - ref).norm() / ref.norm()).item()
    return err if err == err else float("inf")


def launch(kind: str, config: dict, group: int, packed: dict[int, object]):
    """``fn(x, i)``: layer ``i`` of the benchmark's weights through launch ``kind`` with ``config``: "gemv",
    "tiled" or "dequant" (``awq_gemm`` on the AWQ layout), or on the K-major repack of the same layers
    (``packed`` by index) "kmajor" (``int4_gemv``), "kmajor_dequant" (dequantize, then cuBLAS) and
    "kmajor_linear" (``int4_linear``: one of those two by the number of rows, as served)."""
    from leanserve.kernels._workspace import scratch_matrix
    from leanserve.kernels.awq_gemm import awq_gemm
    from leanserve.kernels.int4_gemv import Int4GemvConfig, int4_dequant_linear, int4_gemv, int4_linear

    if kind == "kmajor":
        cfg = Int4GemvConfig(**config)
        return lambda x, w, i: int4_gemv(x, packed[i], config=cfg)
    if kind == "kmajor_linear":  # what an AWQ model serves through on CUDA (AWQLinear's "kmajor" backend)
        return lambda x, w, i: int4_linear(x, packed[i])
    if kind == "kmajor_dequant":
        return lambda x, w, i: int4_dequant_linear(x, packed[i])
    # The dequantization alone, as W [K, N] (the matmul left out): the K-major kernel at a tile, awq_gemm's.
    if kind == "kmajor_dequant_only":
        from leanserve.kernels.int4_gemv import dequantize_int4

        def dequant_kmajor(x, w, i):
            weight = packed[i]
            out = scratch_matrix(x.device, "quant.py kmajor weight", weight.out_features, weight.in_features, x.dtype)
            return dequantize_int4(weight, out, **config).t()
        return dequant_kmajor
    if kind == "dequant_only":
        from leanserve.kernels.awq_gemm import awq_dequantize

        def dequant_awq(x, w, i):
            qweight, qzeros, scales = w
            out = scratch_matrix(x.device, "quant.py awq weight", qweight.shape[0], scales.shape[1], x.dtype)
            return awq_dequantize(qweight, qzeros, scales, group, out)
        return dequant_awq
    extra = {"gemv": {"gemv_config": config}, "tiled": {"tiled_config": config}}.get(kind, {})
    return lambda x, w, i: awq_gemm(x, *w, group, force=kind, **extra)


def repacked(layers: list, group: int) -> dict[int, object]:
    """The K-major repack of each benchmark layer (``int4_gemv``'s layout), by index."""
    from leanserve.kernels.int4_gemv import KMajorInt4

    return {i: KMajorInt4.from_awq(*w, group) for i, w in enumerate(layers)}


def sweep_launch_configs(layers: list, k: int, group: int, ms: list[int],
                         grids: dict[int, list[tuple[str, dict]]] | None = None) -> dict[str, float | str]:
    """Time launch configs (or ``grids``: {M: [(kind, config)]}): the GEMVs at M = 1 to 8, the dequantize
    kernels alone and the tiled GEMM at M = 16, the tiled GEMM at 64 and 256; print each, return the best
    per M."""
    from leanserve.kernels.awq_reference import awq_gemm_reference, dequantize_awq

    tiled = [dict(block_m=bm, block_c=c, block_k=64, num_warps=4) for bm in (16, 64, 128) for c in (8, 16)]
    grids = grids or {
        # The served K-major GEMV: its default (8 rows x 4 warps, one tile of all K, the fp16-pair math
        # for fp16 x), the fp32 math, and rows, warps and chunks either side; awq_gemm's GEMV default
        # for comparison (its sweeps are in RESULTS.md).
        1: [("kmajor", {}), ("kmajor", dict(math="fp32")), ("gemv", {})]
           + [("kmajor", dict(block_n=bn, num_warps=w, chunks_per_thread=c))
              for bn, w, c in ((4, 4, 1), (16, 4, 1), (8, 2, 2), (8, 8, 1), (16, 2, 2))]
           + [("kmajor", dict(pdl=False)), ("kmajor", dict(unpack="shift"))],
        **{m: [("kmajor", {}), ("kmajor", dict(math="fp32"))]
              + [("kmajor", dict(block_n=bn, num_warps=w)) for bn, w in ((2, 4), (4, 4), (8, 4), (4, 2), (8, 8))]
           for m in (2, 4, 6, 8)},
        # M = 16: the dequantize-then-matmul path's kernel alone, the K-major one by tile, beside awq_gemm's.
        16: [("dequant_only", {}), ("kmajor_dequant_only", {})]
            + [("kmajor_dequant_only", dict(block_n=bn, chunks=c, num_warps=w))
               for bn, c, w in ((4, 32, 4), (16, 8, 4), (64, 8, 4), (32, 16, 8), (8, 64, 4), (16, 32, 8))]
            + [("tiled", cfg) for cfg in tiled if cfg["block_m"] == 16],
        64: [("tiled", cfg) for cfg in tiled if cfg["block_m"] == 64],
        256: [("tiled", cfg) for cfg in tiled if cfg["block_m"] >= 64],
    }
    best: dict[str, float | str] = {}
    packed = repacked(layers, group) if any(kind == "kmajor" for c in grids.values() for kind, _ in c) else {}
    weight_ref = dequantize_awq(*layers[0], group, torch.float32)  # [K, N], for the "_only" kinds
    for m, configs in grids.items():
        if m not in ms:
            continue
        x = torch.randn(m, k, dtype=torch.float16, device="cuda")
        ref = awq_gemm_reference(x.float(), *layers[0], group)
        found = None
        for kind, cfg in configs:
            try:
                fn = launch(kind, cfg, group, packed)
                # each config is checked before it is timed: a fast wrong kernel must not win the sweep
                err = relative_error(fn(x, layers[0], 0), weight_ref if kind.endswith("_only") else ref)
                t = graph_us([lambda w=w, i=i, x=x, fn=fn: fn(x, w, i) for i, w in enumerate(layers)], 5)
            except Exception as exc:  # a config that does not compile or fit is skipped, and said
                print(f"  M={m} {kind} {cfg}: failed ({type(exc).__name__}: {str(exc)[:80]})")
                continue
            ok = err < 1e-2
            print(f"  M={m} {kind} {cfg}: {t:.1f} us, rel err {err:.1e}{'' if ok else ' WRONG'}")
            if not ok:
                continue
            if found is None or t < found[0]:
                found = (t, f"{kind} {cfg}")
        if found is not None:
            say(f"best launch at M={m}", f"{found[1]}: {found[0]:.1f} us")
            best[f"best_us_m{m}"], best[f"best_config_m{m}"] = found[0], found[1]
    return best


def random_awq_layers(k: int, n: int, group: int, copies: int, seed: int = 0) -> list[tuple[torch.Tensor, ...]]:
    """``copies`` random AWQ layers ``(qweight, qzeros, scales)`` on the GPU: benchmarks cycle through
    them so that the weights are read from memory, not from L2."""
    from leanserve.kernels.awq_reference import random_awq

    gen = torch.Generator().manual_seed(seed)
    return [tuple(t.cuda() for t in random_awq(k, n, group, gen)) for _ in range(copies)]


def gpu_kernel_bench(sweep: bool = False, sweep_m: Sequence[int] = (1, 16, 64, 256)) -> dict[str, float]:
    """AWQ int4 against fp16 ``torch.matmul`` on a Llama-7B MLP layer (in 4096, out 11008). The default
    is what an AWQ model serves through on CUDA: ``int4_linear`` on the K-major repack (``kmajor_linear``);
    beside it each launch it chooses between, and ``awq_gemm``'s on the checkpoint's own layout."""
    from leanserve.kernels.awq_gemm import launch_for
    from leanserve.kernels.awq_reference import awq_gemm_reference
    from leanserve.kernels.int4_gemv import takes_gemv

    k, n, group, copies = 4096, 11008, 128, 8
    layers = random_awq_layers(k, n, group, copies)
    packed = repacked(layers, group)
    dense = [torch.randn(k, n, dtype=torch.float16, device="cuda") * 0.01 for _ in range(copies)]
    dense_nk = [w.t().contiguous() for w in dense]  # the layout the K-major dequantize gives cuBLAS
    results: dict[str, float] = {"gemm_k": k, "gemm_n": n}
    say("GPU", f"{torch.cuda.get_device_name()}, AWQ GEMM {k}x{n} group {group}, {copies} weight copies")
    for m in (1, 2, 3, 4, 5, 6, 8, 16, 32, 64, 256):
        x = torch.randn(m, k, dtype=torch.float16, device="cuda")
        ref = awq_gemm_reference(x.float(), *layers[0], group)
        t_fp16 = graph_us([lambda x=x, w=w: torch.matmul(x, w) for w in dense])
        # The two K-major launches the served path (int4_linear) picks between, where both run (where
        # LINEAR_GEMV_MAX_M should sit), and awq_gemm's own choice on the AWQ layout (the "triton" backend,
        # for shapes K-major rejects).
        kinds = (["kmajor"] if m <= 8 else []) + (["kmajor_dequant"] if m > 1 else []) + ["awq_" + launch_for(m)]
        served = "kmajor" if takes_gemv(x) else "kmajor_dequant"
        times, errors = {}, {}
        for kind in kinds:
            fn = launch(kind.removeprefix("awq_"), {}, group, packed)
            errors[kind] = relative_error(fn(x, layers[0], 0), ref)
            times[kind] = graph_us([lambda x=x, w=w, i=i, fn=fn: fn(x, w, i) for i, w in enumerate(layers)])
        t_int4 = times[served]
        say(f"GEMM M={m}: int4 / fp16 (us), speedup", f"{t_int4:.1f} / {t_fp16:.1f}, {t_fp16 / t_int4:.2f}x "
            f"(served: {served}, {k * n / 2 / t_int4 / 1e3:.0f} GB/s of int4 weights; rel err {errors[served]:.1e})")
        results[f"gemm_us_int4_m{m}"], results[f"gemm_us_fp16_m{m}"] = t_int4, t_fp16
        results[f"gemm_speedup_m{m}"] = t_fp16 / t_int4
        if m in (16, 256):  # cuBLAS on the dequantized K-major layout ([N, K], F.linear) against [K, N]
            t_linear = graph_us([lambda x=x, w=w: torch.nn.functional.linear(x, w) for w in dense_nk])
            say(f"  M={m} fp16 F.linear on W [N, K] (us)", f"{t_linear:.1f} (torch.matmul on W [K, N]: {t_fp16:.1f})")
            results[f"gemm_us_fp16_linear_m{m}"] = t_linear
        for kind, t in times.items():
            say(f"  M={m} {kind} (us), speed vs fp16, rel err", f"{t:.1f}, {t_fp16 / t:.2f}x, {errors[kind]:.1e}")
            results[f"gemm_us_{kind}_m{m}"] = t
    # A second shape, Llama-7B's attention projections (4096 -> 4096): whether the defaults, tuned on the
    # MLP shape, carry over.
    n2 = 4096
    square = random_awq_layers(k, n2, group, copies)
    square_packed = repacked(square, group)
    dense2 = [torch.randn(k, n2, dtype=torch.float16, device="cuda") * 0.01 for _ in range(copies)]
    x = torch.randn(1, k, dtype=torch.float16, device="cuda")
    square_fns = [launch(kind, {}, group, square_packed) for kind in ("kmajor_linear", launch_for(1))]
    t_int4, t_awq = (graph_us([lambda w=w, i=i, fn=fn: fn(x, w, i) for i, w in enumerate(square)])
                     for fn in square_fns)
    t_fp16 = graph_us([lambda w=w: torch.matmul(x, w) for w in dense2])
    say(f"GEMM {k}x{n2} M=1: int4 / awq_gemm / fp16 (us), speedups",
        f"{t_int4:.1f} / {t_awq:.1f} / {t_fp16:.1f}, {t_fp16 / t_int4:.2f}x / {t_fp16 / t_awq:.2f}x")
    results["square_us_int4_m1"], results["square_us_fp16_m1"] = t_int4, t_fp16
    results["square_us_awq_gemv_m1"] = t_awq
    if sweep:
        results.update(sweep_launch_configs(layers, k, group, list(sweep_m)))
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="fewer tokens everywhere (a smoke run)")
    p.add_argument("--model", default=None, help="source model folder (default: the embedded one)")
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/leanserve-bench-quant"))
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--no-reuse", action="store_true", help="re-quantize even if --work-dir has the models")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads for decode")
    p.add_argument("--gpu-only", action="store_true", help="only the AWQ GEMM vs fp16 benchmark (needs CUDA)")
    p.add_argument("--sweep", action="store_true", help="with CUDA: also sweep the launch configs")
    p.add_argument("--sweep-m", type=lambda v: [int(m) for m in v.split(",")], default=[1, 16, 64, 256],
                   help="the M values --sweep covers, comma-separated")
    p.add_argument("--gemv-configs", type=json.loads, default=None, metavar="JSON",
                   help="with CUDA: sweep only these GEMV launch configs at M=1, skipping the M table: a JSON "
                        "list of gemv_config dicts, or of [kind, config] pairs (kind \"kmajor\": an "
                        "Int4GemvConfig dict for int4_gemv)")
    args = p.parse_args()
    if args.gpu_only or args.gemv_configs:
        if not torch.cuda.is_available():
            print("benchmarks/quant.py --gpu-only: no CUDA device, nothing to run.")
            print(json.dumps({"skipped": "no CUDA device"}))
            return
        if args.gemv_configs:
            k, n, group = 4096, 11008, 128
            configs = [("gemv", cfg) if isinstance(cfg, dict) else tuple(cfg) for cfg in args.gemv_configs]
            print(json.dumps(sweep_launch_configs(random_awq_layers(k, n, group, 8), k, group, [1], {1: configs})))
            return
        print(json.dumps(gpu_kernel_bench(args.sweep, args.sweep_m)))
        return

    src = Path(resolve_model_path(args.model))
    from leanserve.model.config import ModelConfig

    group = pick_group_size("auto", ModelConfig.from_pretrained(src))
    pride, shakespeare = args.data_dir / "pride_and_prejudice.txt", args.data_dir / "shakespeare.txt"
    work = args.work_dir / ("quick" if args.quick else "full")
    awq_dir, rtn_dir = work / "awq", work / "rtn"
    samples = 4 if args.quick else 16  # calibration sequences of 512 tokens
    print(f"model {src}  group size {group}  decode threads {args.threads}  [{load()}]")

    t_awq = quantize(src, awq_dir, "awq", group, pride, not args.no_reuse, samples)
    t_rtn = quantize(src, rtn_dir, "rtn", group, pride, not args.no_reuse, samples)
    say("quantize time AWQ / RTN (s, 0 = reused)", f"{t_awq:.0f} / {t_rtn:.0f}")

    mem = {name: weight_memory(load_model(d, torch.device("cpu"), torch.float32))
           for name, d in (("fp32", src), ("awq", awq_dir))}
    ratio = mem["awq"].linear_ratio_vs_fp16
    say("linear weights FP32 / INT4 (MiB)",
        f"{mem['fp32'].linear_bytes / 2**20:.1f} / {mem['awq'].linear_bytes / 2**20:.1f}")
    say("INT4 linear bytes / FP16 bytes", f"{100 * ratio:.1f}%")
    say("all weights FP32 / INT4 model (MiB)",
        f"{mem['fp32'].total_bytes / 2**20:.1f} / {mem['awq'].total_bytes / 2**20:.1f}")

    tokens = 1024 if args.quick else 4096
    data = [pride, shakespeare]
    # Quality depends only on the (reused) checkpoints: keep it beside them so a rerun for timings skips it.
    cache = work / "quality.json"
    if not args.no_reuse and cache.exists():
        ev = {k: [DatasetResult(**d) for d in v] for k, v in json.loads(cache.read_text()).items()}
        say("quality figures", f"reused from {cache}")
    else:
        ev = {name: evaluate(d, data, src, max_tokens=tokens).datasets
              for name, d in (("awq", awq_dir), ("rtn", rtn_dir))}
        cache.write_text(json.dumps({k: [asdict(d) for d in v] for k, v in ev.items()}))
    ppl = {}
    for i, label in enumerate(("held-out P&P", "Shakespeare")):
        a, r = ev["awq"][i], ev["rtn"][i]
        fp = a.baseline_ppl
        say(f"ppl {label} FP32 / AWQ / RTN", f"{fp:.3f} / {a.ppl:.3f} / {r.ppl:.3f}")
        say(f"  KL vs FP32 AWQ / RTN ({a.tokens} tok)", f"{a.mean_kl:.4f} / {r.mean_kl:.4f}")
        say("  top-1 agreement AWQ / RTN", f"{a.top1_agreement:.3f} / {r.top1_agreement:.3f}")
        ppl[i] = (fp, a.ppl, r.ppl)

    new_tokens = 32 if args.quick else 128
    speed = {}
    for name, d, matmul in (("fp32", src, "float32"), ("bf16", src, "bfloat16"), ("int4", awq_dir, "float32")):
        for batch in (1, 32):
            tok_s, ms = decode_speed(d, batch, new_tokens, args.threads, matmul_dtype=matmul)
            speed[(name, batch)] = tok_s
            say(f"decode {name.upper()} batch {batch}", f"{tok_s:.1f} tok/s ({ms:.1f} ms/step)")
    head = lm_head_ms(src)
    say("  of which fp32 lm_head alone, batch 1", f"{head:.2f} ms/token")
    head_int4 = lm_head_ms(awq_dir)
    say("  INT4 model's lm_head (int8) alone, batch 1", f"{head_int4:.2f} ms/token")

    gpu = gpu_kernel_bench(args.sweep, args.sweep_m) if torch.cuda.is_available() else {}
    result = {
        "ppl_fp": ppl[0][0], "ppl_awq": ppl[0][1], "ppl_rtn": ppl[0][2],
        "ppl_fp_shakespeare": ppl[1][0], "ppl_awq_shakespeare": ppl[1][1], "ppl_rtn_shakespeare": ppl[1][2],
        "kl_awq": ev["awq"][0].mean_kl, "kl_rtn": ev["rtn"][0].mean_kl,
        "linear_bytes_ratio": ratio,
        "tok_s_fp32_batch1": speed[("fp32", 1)], "tok_s_int4_batch1": speed[("int4", 1)],
        "tok_s_fp32_batch32": speed[("fp32", 32)], "tok_s_int4_batch32": speed[("int4", 32)],
        "int4_vs_fp32_tok_s_batch1": speed[("int4", 1)] / speed[("fp32", 1)],
        "int4_vs_fp32_tok_s_batch32": speed[("int4", 32)] / speed[("fp32", 32)],
        "tok_s_bf16_batch1": speed[("bf16", 1)], "tok_s_bf16_batch32": speed[("bf16", 32)],
        "int4_vs_bf16_tok_s_batch1": speed[("int4", 1)] / speed[("bf16", 1)],
        "int4_ms_per_token_batch1": 1000 / speed[("int4", 1)], "lm_head_ms_batch1": head,
        "lm_head_ms_int4_batch1": head_int4,
        "group_size": group, "threads": args.threads, "quick": args.quick, "loadavg": os.getloadavg()[0], **gpu,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
