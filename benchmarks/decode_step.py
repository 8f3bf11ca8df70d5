"""End-to-end decode step of a ~1B Llama on CUDA: eager vs CUDA graphs, against the weight-read floor.

Builds TinyLlama-1.1B's shape (22 layers, hidden 2048, 32 query / 4 KV heads, MLP 5632, vocab 32000)
with random bf16 weights (nothing is downloaded), a paged KV cache and our ModelRunner, then for each
batch size, every sequence at ``--context`` tokens:

- eager forward: the model's forward launched op by op (host-bound for small batches);
- graph replay: the captured decode graph alone (CUDA events, median);
- runner step: what serving pays per step: inputs copied in, graph replay, logits, greedy sampling
  and the results back on the host (wall clock, median).

All of it for each variant of the model's kernels (``--variants``; all of them by default):

- ``fused``: our fused Triton layer kernels (RMSNorm + residual, rotary, SiLU-and-mul), cuBLAS
  (``F.linear``) linears, no programmatic dependent launch (PDL): what was measured before;
- ``gemv_pdl``: the model's own ops with PDL on, what it runs on an sm_90+ GPU: the Triton GEMV for
  1-row linears (``gemv.linear``, which takes it only with PDL), cuBLAS for the rest;
- ``fused_pdl``: cuBLAS linears, PDL on our kernels;
- ``unfused``: the torch ops the fused layer kernels replace, cuBLAS linears;
- ``rotary_apart``: ``gemv_pdl`` with the rotary embedding and the KV-cache write as two launches per
  layer, as before ``kv_cache.write_kv_cache_rotary`` made them one;
- ``layer_apart``: ``gemv_pdl`` without the fused layer path of 1-row batches (``DecodeOps``: the
  gating and the residual adds in the GEMVs), i.e. the residual add fused into the next norm kernel and
  a SiLU kernel after gate_up, as before;
- ``gate_apart`` / ``residual_apart``: ``gemv_pdl`` with one of the 1-row fusions taken apart again
  (the SiLU kernel after gate_up; an add after o_proj and down_proj), the other kept. (The third,
  the RMSNorm folded into the next GEMV, lost and was removed: RESULTS.md.)
- ``awq_int4``: the model's own ops on the same model with AWQ int4 projections (random codes, group
  128) in fp16, as an AWQ checkpoint is served: the K-major int4 GEMV for decode batches of up to 6
  rows. Its floor counts the int4 bytes (and the fp16 LM head), so it is a different floor;
- ``persistent``: ``gemv_pdl`` with the GEMV's resident-grid launch (``GemvConfig.persistent``: two
  programs per SM, each streaming several row blocks) for every 1-row linear.

PDL variants are skipped where the GPU cannot do PDL (before sm_90). Each variant also reports how many
of its greedy tokens equal the first variant's (bf16 rounding differs between matmuls, so random-weight
near-ties may flip a few; ``rotary_apart`` computes what ``gemv_pdl`` does, so all of its tokens must agree).
Every variant starts from the same K/V cache contents.

The floor is the bytes a step must read (every weight but the embedding table, plus the step's K/V)
over the measured device copy bandwidth. Each variant also profiles one eager step (kernel count and
the top kernels by GPU time) and prints a JSON line of its own when done; the run ends with one JSON
line holding everything.

    python benchmarks/decode_step.py [--context 512] [--batches 1,8,32,64] [--variants fused,gemv_pdl,...]
    python benchmarks/decode_step.py --matmul-probe      (projection matmuls only: benchmarks/matmul_probe.py)

Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from gpu_timing import copy_gbps, event_ms, wall_ms


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


def build_model(config, device: torch.device, dtype: torch.dtype, ops, awq_group: int | None = None):
    """Random weights from a fixed seed: every call builds the same model, with the given kernel ops, as
    ``load_model`` builds one (the checkpoint's linear factory, floats in ``dtype``, the factory's repack).
    ``awq_group``: every decoder projection AWQ int4 in groups of that size instead (random codes; scales
    sized so the weights are ~0.02 like the dense ones), repacked for the backend that serves it (on CUDA
    the K-major int4 GEMV, ``quant/awq_linear.py``)."""
    from leanserve.model.llama import LlamaForCausalLM
    from leanserve.model.loader import linear_factory_for
    from leanserve.quant.awq_format import quantization_config

    if awq_group is not None:
        config = dataclasses.replace(config, quantization=quantization_config(awq_group))
    factory = linear_factory_for(config, dtype, device, ops.linear)
    with torch.device("meta"):
        model = LlamaForCausalLM(config, factory, ops)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if name.startswith("rotary."):
                continue  # rebuilt by reset_buffers
            if t.dtype == torch.int32:  # AWQ qweight, qzeros: any 32 bits are eight valid nibbles
                t.copy_(torch.randint(-2**31, 2**31 - 1, t.shape, dtype=torch.int32, device=device, generator=gen))
            elif name.endswith("scales"):  # AWQ: w = (q - z) * s with |q - z| < 16
                t.copy_(torch.rand(t.shape, device=device, generator=gen) * 0.004)
            elif name.endswith("norm.weight") or "layernorm" in name:
                t.data = torch.ones_like(t, dtype=dtype)
            else:
                t.data = (torch.randn(t.shape, generator=gen, device=device) * 0.02).to(dtype)
    if hasattr(factory, "finalize"):
        factory.finalize(model)
    model.reset_buffers(device)
    return model.eval().requires_grad_(False)


def read_bytes(model) -> int:
    """Bytes a decode step reads of the model's weights: every parameter and weight buffer (int4 codes
    and factors included) but the embedding table (one row is read) and the rotary tables."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    return sum(t.numel() * t.element_size() for n, t in tensors if "embed" not in n and "rotary" not in n)


def decode_batch(batch: int, context: int, block_size: int, vocab: int, shuffle: bool = True):
    """``batch`` sequences of ``context`` random tokens, each decoding its last one. Their blocks are
    disjoint and shuffled, as after real traffic; ``shuffle=False`` hands them out in order, as the block
    manager does for a lone sequence (the CPU attention then reads a view of the cache)."""
    from leanserve.model.runner import StepSeq
    from leanserve.model.sampler import SampleRequest
    from leanserve.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=1 << 20, temperature=0.0, ignore_eos=True)
    blocks = -(-context // block_size)
    gen = torch.Generator().manual_seed(batch)
    perm = torch.randperm(batch * blocks, generator=gen).tolist() if shuffle else list(range(batch * blocks))
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


def profile_host_step(runner, seqs, steps: int = 50) -> None:
    """cProfile over ``steps`` runner steps (graph replay included): the host functions that make the step
    cost more than its graph (third session: 1.569 against 1.034 ms at batch 1)."""
    import cProfile
    import io
    import pstats

    runner.execute(seqs)
    torch.cuda.synchronize()
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(steps):
        runner.execute(seqs)
    profile.disable()
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(20)
    print(f"host profile of {steps} batch-1 runner steps (tottime = time in the function itself):")
    print(out.getvalue())


# The GEMV config the model's 1-row linears use, per variant (default: gemv's own, PDL on).
GEMV_CONFIGS = {"persistent": {"pdl": True, "persistent": True}}


def rotary_then_write(apply_rotary, query, key, value, positions, cos, sin, k_cache, v_cache, slot_mapping):
    """``write_kv_cache_rotary`` as ``apply_rotary`` (the Triton kernel, or the torch ops of ``unfused``)
    followed by the Triton cache write: the launches it replaced."""
    from leanserve.kernels.kv_cache import write_kv_cache

    query, key = apply_rotary(query, key, positions, cos, sin)
    write_kv_cache(key, value, k_cache, v_cache, slot_mapping)
    return query, key


def kernel_variants(device: torch.device) -> dict[str, tuple[object, bool]]:
    """Variant name -> (the model's ModelOps, PDL on)."""
    import torch.nn.functional as F
    from leanserve.kernels import backend

    triton_ops = backend.get_model_ops(device)  # fused layers + the GEMV for decode-sized linears
    cublas = backend.ModelOps(triton_ops.attention, triton_ops.layers, F.linear)
    from leanserve.kernels import reference
    from leanserve.kernels.fused_layers import apply_rotary

    def rotary_apart(rotary):
        return dataclasses.replace(triton_ops.attention,
                                   write_kv_cache_rotary=functools.partial(rotary_then_write, rotary))

    unfused = backend.ModelOps(rotary_apart(reference.apply_rotary), backend.reference_layer_ops(), F.linear)
    apart = dataclasses.replace(triton_ops, attention=rotary_apart(apply_rotary))
    layer_apart = dataclasses.replace(triton_ops, decode=backend.reference_decode_ops())
    variants = {"fused": (cublas, False), "gemv_pdl": (triton_ops, True), "fused_pdl": (cublas, True),
                "unfused": (unfused, False), "rotary_apart": (apart, True), "layer_apart": (layer_apart, True),
                "persistent": (triton_ops, True), "awq_int4": (triton_ops, True)}
    # One fusion of DecodeOps at a time taken apart again (the others kept): which of them pays.
    from leanserve.kernels import gemv
    from leanserve.kernels.fused_layers import silu_and_mul

    fused = triton_ops.decode

    def gate_apart(x, norm_weight, eps, weight, bias=None):
        return silu_and_mul(gemv.norm_linear(x, norm_weight, eps, weight, bias))

    def residual_apart(x, weight, bias, residual):
        return residual.add_(gemv.linear(x, weight, bias))

    for name, decode in (
        ("gate_apart", dataclasses.replace(fused, norm_gated_linear=gate_apart)),
        ("residual_apart", dataclasses.replace(fused, linear_residual=residual_apart)),
    ):
        variants[name] = (dataclasses.replace(triton_ops, decode=decode), True)
    return variants


def use_gemv_config(variant: str) -> None:
    """The 1-row GEMV launch the model's linears (and decode fusions) take for ``variant`` from now on."""
    from leanserve.kernels import gemv

    gemv.MODEL_LAUNCH = gemv.GemvConfig(**GEMV_CONFIGS.get(variant, {"pdl": True}))


def set_pdl(on: bool, device: torch.device) -> bool:
    """Turn PDL on or off for every launch from now on (the launchers read LEANSERVE_PDL each time);
    returns whether it is on."""
    from leanserve.kernels._device import pdl_enabled

    os.environ["LEANSERVE_PDL"] = "1" if on else "0"
    return pdl_enabled(device)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batches", default="1,8,32,64")
    p.add_argument("--iters", type=int, default=50)
    known = list(kernel_variants(torch.device("cpu")))  # the names (the CPU builds them without CUDA)
    p.add_argument("--variants", default=",".join(known), help=f"comma-separated subset of {','.join(known)}")
    p.add_argument("--profile-host", action="store_true",
                   help="also profile the host side of the first variant's batch-1 runner step (cProfile over 50 "
                        "steps): where the step's time above the graph replay goes")
    p.add_argument("--matmul-probe", action="store_true",
                   help="only time the projections: cuBLAS vs the Triton GEMV (benchmarks/matmul_probe.py)")
    args = p.parse_args()
    unknown = set(args.variants.split(",")) - set(known)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {known}")
    if not torch.cuda.is_available():
        print("benchmarks/decode_step.py: no CUDA device, nothing to benchmark.")
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0

    from leanserve.model.runner import ModelRunner, allocate_kv_cache

    device, dtype, block_size = torch.device("cuda"), torch.bfloat16, 16
    if args.matmul_probe:
        import matmul_probe

        bandwidth = copy_gbps()
        head = {"device": torch.cuda.get_device_name(), "copy_gbps": bandwidth}
        print(f"device {head['device']}: copy {bandwidth:.0f} GB/s; projection matmuls, bf16")
        results = matmul_probe.run(bandwidth, lambda part: print(json.dumps({**head, **part})))
        print(json.dumps({**head, **results}))
        return 0
    batches = [int(b) for b in args.batches.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        config = tinyllama_config(Path(tmp))
    all_variants = kernel_variants(device)
    variants = {name: all_variants[name] for name in args.variants.split(",")}
    blocks = max(batches) * -(-args.context // block_size)
    caches = {}  # by dtype: the AWQ variant runs in fp16
    bandwidth = copy_gbps()
    name = torch.cuda.get_device_name()
    results = {}
    tokens: dict[str, dict[int, list[int]]] = {}  # of the bf16 variants (same weights), by batch
    print(f"device {name}: copy {bandwidth:.0f} GB/s; context {args.context}")
    for variant, (ops, pdl) in variants.items():
        awq = variant == "awq_int4"
        model_dtype = torch.float16 if awq else dtype  # AWQ checkpoints are served in fp16
        if model_dtype not in caches:
            caches[model_dtype] = allocate_kv_cache(config, blocks, block_size, model_dtype, device)
        kv = caches[model_dtype]
        kv_bytes_per_token = config.kv_bytes_per_token(model_dtype.itemsize)
        # Every variant starts from the same cache: each step writes its K/V into blocks that the next
        # batch size's sequences read, so the tokens compared across variants need the same history.
        gen = torch.Generator(device=device).manual_seed(1)
        for k_cache, v_cache in kv:
            k_cache.normal_(generator=gen)
            v_cache.normal_(generator=gen)
        if set_pdl(pdl, device) != pdl:
            print(f"\n[{variant}] skipped: this GPU cannot launch with PDL (needs sm_90+)")
            continue
        use_gemv_config(variant)
        model = build_model(config, device, model_dtype, ops, awq_group=128 if awq else None)
        weight_bytes = read_bytes(model)
        runner = ModelRunner(model, kv, block_size, device)
        start = time.perf_counter()
        runner.capture_decode_graphs(max_model_len=config.max_position_embeddings, max_batch=max(batches))
        capture_s = time.perf_counter() - start
        graphs = runner.decode_graphs
        launches, top = profile_eager_step(runner, decode_batch(1, args.context, block_size, config.vocab_size))
        linear = "cublas" if ops.linear is torch.nn.functional.linear else "triton_gemv"
        print(f"\n[{variant}: {linear} linears, PDL {'on' if pdl else 'off'}] {len(graphs.buckets)} graphs "
              f"captured in {capture_s:.1f} s; {launches} kernels per step; {weight_bytes / 1e9:.2f} GB of weights "
              "read per step")
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
            vs_first = first = None
            if not awq:  # the AWQ model has other weights: its tokens are its own
                tokens.setdefault(variant, {})[batch] = with_graph
                first = next(iter(tokens))  # the first bf16 variant run is the reference for the others
                if first != variant:
                    vs_first = sum(a == b for a, b in zip(with_graph, tokens[first][batch])) / batch
            rows.append(dict(batch=batch, floor_ms=floor, eager_forward_ms=eager, graph_ms=replay, step_ms=step,
                             graph_over_floor=replay / floor, step_over_floor=step / floor,
                             tok_s=1000 * batch / step, graph_eager_token_agreement=agree,
                             tokens_agree_with_first_variant=vs_first))
            print(f"{batch:>5} {floor:>9.3f} {eager:>10.3f} {replay:>8.3f} {step:>8.3f} {replay / floor:>12.2f} "
                  f"{step / floor:>11.2f} {1000 * batch / step:>9.0f}  graph/eager tokens agree {agree:.0%}"
                  + ("" if vs_first is None else f", with {first} {vs_first:.0%}"))
        print("top kernels of one eager step at batch 1 (us total, count):")
        for key, us, count in top:
            print(f"  {us:9.1f} {count:5d}  {key}")
        if args.profile_host and variant == next(iter(variants)):
            try:  # a diagnostic: it must not cost the variants after it
                profile_host_step(runner, decode_batch(1, args.context, block_size, config.vocab_size))
            except Exception as exc:
                print(f"host profile failed: {type(exc).__name__}: {exc}")
        results[variant] = dict(capture_s=capture_s, kernels_per_step=launches, weight_bytes=weight_bytes, rows=rows,
                                linear=linear, pdl=pdl)
        print(json.dumps({"variant": variant, **results[variant]}))  # kept if a time limit cuts the run
        del runner, graphs, model
        torch.cuda.empty_cache()
    os.environ.pop("LEANSERVE_PDL", None)
    print("\nCUDA graph ms (x floor) by variant:")
    for variant, result in results.items():
        print(f"  {variant:10s} " + "  ".join(f"b{r['batch']}: {r['graph_ms']:.3f} ({r['graph_over_floor']:.2f}x)"
                                              for r in result["rows"]))
    print(json.dumps({"device": name, "copy_gbps": bandwidth, "context": args.context, **results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
