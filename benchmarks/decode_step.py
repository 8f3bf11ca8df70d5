"""End-to-end decode step of a ~1B Llama on CUDA: eager vs CUDA graphs, against the weight-read floor.

Builds TinyLlama-1.1B's shape (22 layers, hidden 2048, 32 query / 4 KV heads, MLP 5632, vocab 32000)
with random bf16 weights (nothing is downloaded), a paged KV cache and our ModelRunner, then for each
batch size, every sequence at ``--context`` tokens:

- eager forward: the model's forward launched op by op (host-bound for small batches);
- graph replay: the captured decode graph alone (CUDA events, median);
- runner step: what serving pays per step: inputs copied in, graph replay, logits, greedy sampling
  and the results back on the host (wall clock, median).

All of it twice: with our fused Triton layer kernels (RMSNorm + residual, rotary, SiLU-and-mul) and
with the unfused torch ops they replace.

The floor is the bytes a step must read (every weight but the embedding table, plus the step's K/V)
over the measured device copy bandwidth. Each variant also profiles one eager step (kernel count and
the top kernels by GPU time). Ends with one JSON line.

    python benchmarks/decode_step.py [--context 512] [--batches 1,8,32,64]

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from gpu_timing import copy_gbps, event_ms, graph_us, wall_ms


def tinyllama_config(model_dir: Path):
    from leanserve.model.config import ModelConfig

    raw = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32000,
        "hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 22, "num_attention_heads": 32,
        "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "max_position_embeddings": 2048,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    }
    (model_dir / "config.json").write_text(json.dumps(raw))
    return ModelConfig.from_pretrained(model_dir)


def build_model(config, device: torch.device, dtype: torch.dtype, ops):
    """Random weights from a fixed seed: every call builds the same model, with the given kernel ops."""
    from leanserve.model.layers import default_linear_factory
    from leanserve.model.llama import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config, default_linear_factory(dtype), ops)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name:
                param.data = torch.ones_like(param, dtype=dtype)
            else:
                param.data = (torch.randn(param.shape, generator=gen, device=device) * 0.02).to(dtype)
    model.reset_buffers(device)
    return model.eval().requires_grad_(False)


def decode_batch(batch: int, context: int, block_size: int, vocab: int):
    from leanserve.model.runner import StepSeq
    from leanserve.model.sampler import SampleRequest
    from leanserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    blocks = -(-context // block_size)
    gen = torch.Generator().manual_seed(batch)
    perm = torch.randperm(batch * blocks, generator=gen).tolist()  # shuffled, as after real traffic
    seqs = []
    for i in range(batch):
        tokens = torch.randint(0, vocab, (context,), generator=gen).tolist()
        seqs.append(
            StepSeq(
                token_ids=tokens, num_computed=context - 1, num_new=1,
                block_table=perm[i * blocks : (i + 1) * blocks], num_prompt_tokens=context - 1,
                sample=SampleRequest(params, tokens, context - 1),
            )
        )
    return seqs


def profile_eager_step(runner, seqs) -> tuple[int, list[tuple[str, float, int]]]:
    """Kernels launched by one eager step, and the top ones by total GPU time (us, count)."""
    from torch.profiler import ProfilerActivity, profile

    graphs, runner.decode_graphs = runner.decode_graphs, None
    try:
        runner.execute(seqs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.execute(seqs)
            torch.cuda.synchronize()
    finally:
        runner.decode_graphs = graphs
    rows = []
    launches = 0
    for event in prof.key_averages():
        device_us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if device_us > 0:
            rows.append((event.key[:70], device_us, event.count))
            launches += event.count
    rows.sort(key=lambda r: -r[1])
    return launches, rows[:15]


def matmul_probe(device: torch.device, bandwidth: float) -> list[dict]:
    """The 1.1B model's four projections at 1 and 8 rows, bf16: ``F.linear`` (what the model calls)
    against ``torch.mv`` and a matmul with the weight stored transposed. Each time is one call's share
    of a CUDA graph cycling through 8 weight copies (so the weights come from HBM, not L2)."""
    import torch.nn.functional as F

    shapes = {"qkv": (2560, 2048), "o": (2048, 2048), "gate_up": (11264, 2048), "down": (2048, 5632)}
    rows = []
    for name, (out_f, in_f) in shapes.items():
        weights = [torch.randn(out_f, in_f, device=device, dtype=torch.bfloat16) * 0.02 for _ in range(8)]
        transposed = [w.t().contiguous() for w in weights]
        for m in (1, 8):
            x = torch.randn(m, in_f, device=device, dtype=torch.bfloat16)
            variants = {
                "F.linear": [lambda w=w, x=x: F.linear(x, w) for w in weights],
                "x @ W^T stored": [lambda w=w, x=x: x @ w for w in transposed],
            }
            if m == 1:
                variants["torch.mv"] = [lambda w=w, x=x: torch.mv(w, x[0]) for w in weights]
            for label, calls in variants.items():
                us = graph_us(calls)
                gbps = out_f * in_f * 2 / us / 1e3
                rows.append(dict(layer=name, m=m, variant=label, us=us, pct_of_copy=100 * gbps / bandwidth))
                print(f"  {name:8s} {out_f}x{in_f} M={m} {label:15s} {us:7.1f} us  "
                      f"{100 * gbps / bandwidth:5.1f}% of copy")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--matmul-probe", action="store_true", help="only time the projections' matmul variants")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/decode_step.py: no CUDA device, nothing to benchmark.")
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    from leanserve.kernels import backend

    from leanserve.model.runner import ModelRunner, allocate_kv_cache

    device, dtype, block_size = torch.device("cuda"), torch.bfloat16, 16
    if args.matmul_probe:
        bandwidth = copy_gbps()
        print(f"device {torch.cuda.get_device_name()}: copy {bandwidth:.0f} GB/s; projection matmuls, bf16")
        print(json.dumps({"device": torch.cuda.get_device_name(), "copy_gbps": bandwidth,
                          "matmul_probe": matmul_probe(device, bandwidth)}))
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        config = tinyllama_config(Path(tmp))
    fused_ops = backend.get_model_ops(device)
    variants = {  # fused: our Triton RMSNorm+residual / rotary / SiLU-and-mul; unfused: the torch ops
        "fused": fused_ops,
        "unfused": backend.ModelOps(fused_ops.attention, backend.reference_layer_ops()),
    }
    blocks = max(batches) * -(-args.context // block_size)
    kv = allocate_kv_cache(config, blocks, block_size, dtype, device)
    for k_cache, v_cache in kv:  # real numbers, not zeros, in every slot attention reads
        k_cache.normal_()
        v_cache.normal_()
    bandwidth = copy_gbps()
    kv_bytes_per_token = config.kv_bytes_per_token(dtype.itemsize)
    name = torch.cuda.get_device_name()
    results = {}
    for variant, ops in variants.items():
        model = build_model(config, device, dtype, ops)
        weight_bytes = sum(t.numel() * t.element_size() for n, t in model.named_parameters() if "embed" not in n)
        if variant == "fused":
            print(f"device {name}: copy {bandwidth:.0f} GB/s; {weight_bytes / 1e9:.2f} GB of bf16 weights read per "
                  f"step; context {args.context}")
        runner = ModelRunner(model, kv, block_size, device)
        start = time.perf_counter()
        runner.capture_decode_graphs(max_model_len=config.max_position_embeddings, max_batch=max(batches))
        capture_s = time.perf_counter() - start
        graphs = runner.decode_graphs
        launches, top = profile_eager_step(runner, decode_batch(1, args.context, block_size, config.vocab_size))
        print(f"\n[{variant} layer ops] {len(graphs.buckets)} graphs captured in {capture_s:.1f} s; "
              f"{launches} kernels per step")
        header = f"{'batch':>5} {'floor ms':>9} {'eager fwd':>10} {'graph':>8} {'step':>8} {'graph/floor':>12} " \
                 f"{'step/floor':>11} {'tok/s':>9}"
        print(header)
        rows = []
        for batch in batches:
            seqs = decode_batch(batch, args.context, block_size, config.vocab_size)
            step_bytes = weight_bytes + batch * args.context * kv_bytes_per_token
            floor = step_bytes / bandwidth / 1e6
            size = graphs.bucket_for(batch)
            runner.execute(seqs)  # fills the static buffers for this batch
            eager = wall_ms(lambda size=size, g=graphs: g._forward(size), max(10, args.iters // 5))
            replay = event_ms(graphs.graphs[size].replay, args.iters)
            step = wall_ms(lambda seqs=seqs, r=runner: r.execute(seqs), args.iters)
            with_graph = [r.token_id for r in runner.execute(seqs)]
            runner.decode_graphs = None
            eager_tokens = [r.token_id for r in runner.execute(seqs)]
            runner.decode_graphs = graphs
            agree = sum(a == b for a, b in zip(with_graph, eager_tokens)) / batch
            rows.append(dict(batch=batch, floor_ms=floor, eager_forward_ms=eager, graph_ms=replay, step_ms=step,
                             graph_over_floor=replay / floor, step_over_floor=step / floor,
                             tok_s=1000 * batch / step, graph_eager_token_agreement=agree))
            print(f"{batch:>5} {floor:>9.3f} {eager:>10.3f} {replay:>8.3f} {step:>8.3f} {replay / floor:>12.2f} "
                  f"{step / floor:>11.2f} {1000 * batch / step:>9.0f}  graph/eager tokens agree {agree:.0%}")
        print("top kernels of one eager step at batch 1 (us total, count):")
        for key, us, count in top:
            print(f"  {us:9.1f} {count:5d}  {key}")
        results[variant] = dict(capture_s=capture_s, kernels_per_step=launches, rows=rows)
        del runner, graphs, model
        torch.cuda.empty_cache()
    print(json.dumps({"device": name, "copy_gbps": bandwidth, "weight_bytes": weight_bytes, "context": args.context,
                      **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
