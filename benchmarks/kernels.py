"""Benchmark the Triton paged-attention and KV-write kernels on a CUDA GPU.

For each kernel and size: median time over many CUDA-event-timed runs after warm-up, the bytes it must
move divided by that time (GB/s) next to the device's measured copy bandwidth, and the speedup over a
plain-torch baseline (K/V gathered through the block table, then torch SDPA; ``index_copy_`` for the
KV write). Prints a table, then one JSON line with everything.

    python benchmarks/kernels.py [--iters 100] [--warmup 20]

Without CUDA (or without triton) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from gpu_timing import copy_gbps as measure_copy_gbps
from gpu_timing import event_ms, graph_us

BLOCK_SIZE = 16
DTYPE = torch.bfloat16
GRAPH_LAYERS = 22  # TinyLlama's layer count: the graph-sized decode rows time this many calls per graph
DEVICE = "cuda"  # a module constant so the functions can be smoke-run elsewhere


@dataclass
class Result:
    kernel: str
    config: str
    triton_ms: float
    baseline_ms: float
    speedup: float
    gbps: float
    pct_of_copy: float
    tflops: float
    max_abs_err: float


def paged_cache(num_seqs: int, context_len: int, kv_heads: int, head_dim: int, gen: torch.Generator):
    """Caches holding ``num_seqs`` sequences on shuffled blocks, and their block table."""
    blocks_per_seq = -(-context_len // BLOCK_SIZE)
    num_blocks = num_seqs * blocks_per_seq
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.randn(shape, dtype=DTYPE, device=DEVICE, generator=gen)
    v_cache = torch.randn(shape, dtype=DTYPE, device=DEVICE, generator=gen)
    perm = torch.randperm(num_blocks, device=DEVICE, generator=gen).to(torch.int32)
    return k_cache, v_cache, perm.view(num_seqs, blocks_per_seq)


def gather(cache: torch.Tensor, tables: torch.Tensor, length: int) -> torch.Tensor:
    """``[S, KVH, length, D]`` gathered through the block table (what the baseline pays for)."""
    g = cache[tables.long()]  # [S, blocks, block_size, KVH, D]
    return g.flatten(1, 2)[:, :length].transpose(1, 2)


def bench_decode(ops, num_seqs, context_len, heads, kv_heads, head_dim, warmup, iters, copy_gbps, parts=None,
                 max_context=None, note=""):
    """``max_context``: the bound the launch is sized for (a captured decode graph passes max_model_len)."""
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device=DEVICE)
    scale = head_dim**-0.5
    # A graph-sized launch gets a table as wide as max_context (the columns past the context unused).
    width = -(-(max_context or context_len) // BLOCK_SIZE)

    def layer():
        """One layer's K/V caches, wide table, own block table and query."""
        k_cache, v_cache, tables = paged_cache(num_seqs, context_len, kv_heads, head_dim, gen)
        table = torch.zeros(num_seqs, width, dtype=torch.int32, device=DEVICE)
        table[:, : tables.shape[1]] = tables
        query = torch.randn(num_seqs, heads, head_dim, dtype=DTYPE, device=DEVICE, generator=gen)
        return k_cache, v_cache, tables, table, query

    def triton_fn(k_cache, v_cache, tables, table, query):
        return ops.paged_decode_attention(
            query, k_cache, v_cache, table, lens, scale, max_context or context_len, num_partitions=parts
        )

    def baseline_fn(k_cache, v_cache, tables, table, query):
        k, v = gather(k_cache, tables, context_len), gather(v_cache, tables, context_len)
        out = F.scaled_dot_product_attention(query[:, :, None], k, v, scale=scale, enable_gqa=True)
        return out[:, :, 0]

    # A decode graph's launch: a few microseconds of GPU time, far under the launcher's host time, so
    # timed as one layer's share of a graph of GRAPH_LAYERS back-to-back calls, each on its own caches
    # as in the model (the same caches 22 times would be read from L2 after the first).
    layers = [layer() for _ in range(GRAPH_LAYERS if max_context else 1)]
    err = (triton_fn(*layers[0]).float() - baseline_fn(*layers[0]).float()).abs().max().item()
    if max_context:
        t_ms = graph_us([lambda a=a: triton_fn(*a) for a in layers], iters) / 1000
        b_ms = graph_us([lambda a=a: baseline_fn(*a) for a in layers], iters) / 1000
    else:
        t_ms = event_ms(lambda: triton_fn(*layers[0]), iters, warmup)
        b_ms = event_ms(lambda: baseline_fn(*layers[0]), iters, warmup)
    kv_bytes = 2 * num_seqs * context_len * kv_heads * head_dim * DTYPE.itemsize
    io_bytes = 2 * num_seqs * heads * head_dim * DTYPE.itemsize + num_seqs * -(-context_len // BLOCK_SIZE) * 4
    flops = 4 * num_seqs * heads * context_len * head_dim
    split = "auto" if parts is None else str(parts)
    sized = f" (max {max_context})" if max_context else ""
    config = f"{num_seqs}x{context_len}{sized} H{heads}/KV{kv_heads} D{head_dim} split={split}{note}"
    return _result("decode", config, t_ms, b_ms, kv_bytes + io_bytes, flops, copy_gbps, err)


def bench_prefill(ops, num_seqs, chunk, prefix, heads, kv_heads, head_dim, warmup, iters, copy_gbps):
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    context_len = prefix + chunk
    k_cache, v_cache, tables = paged_cache(num_seqs, context_len, kv_heads, head_dim, gen)
    lens = torch.full((num_seqs,), context_len, dtype=torch.int32, device=DEVICE)
    cu = torch.arange(0, num_seqs + 1, dtype=torch.int32, device=DEVICE) * chunk
    query = torch.randn(num_seqs * chunk, heads, head_dim, dtype=DTYPE, device=DEVICE, generator=gen)
    scale = head_dim**-0.5
    # Bottom-right-aligned causal mask: query i of the chunk sits at position prefix + i.
    q_pos = torch.arange(prefix, context_len, device=DEVICE)
    mask = torch.arange(context_len, device=DEVICE)[None, :] <= q_pos[:, None]

    def triton_fn():
        return ops.paged_prefill_attention(query, k_cache, v_cache, tables, cu, lens, scale)

    def baseline_fn():
        k, v = gather(k_cache, tables, context_len), gather(v_cache, tables, context_len)
        q = query.view(num_seqs, chunk, heads, head_dim).transpose(1, 2)
        if prefix == 0:  # plain causal: lets SDPA pick its flash kernel
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
        return out.transpose(1, 2).reshape_as(query)

    err = (triton_fn().float() - baseline_fn().float()).abs().max().item()
    t_ms = event_ms(triton_fn, iters, warmup)
    b_ms = event_ms(baseline_fn, iters, warmup)
    kv_bytes = 2 * num_seqs * context_len * kv_heads * head_dim * DTYPE.itemsize
    io_bytes = 2 * query.numel() * DTYPE.itemsize
    # Causal: each query sees prefix + its index + 1 keys; QK and PV are 2 flops per MAC each.
    visible = num_seqs * (chunk * prefix + chunk * (chunk + 1) // 2)
    flops = 4 * heads * head_dim * visible
    config = f"{num_seqs}x(chunk {chunk} + prefix {prefix}) H{heads}/KV{kv_heads} D{head_dim}"
    return _result("prefill", config, t_ms, b_ms, kv_bytes + io_bytes, flops, copy_gbps, err)


def bench_write(ops, num_tokens, kv_heads, head_dim, warmup, iters, copy_gbps):
    gen = torch.Generator(device=DEVICE).manual_seed(2)
    num_blocks = 4 * num_tokens // BLOCK_SIZE
    shape = (num_blocks, BLOCK_SIZE, kv_heads, head_dim)
    k_cache = torch.zeros(shape, dtype=DTYPE, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    key = torch.randn(num_tokens, kv_heads, head_dim, dtype=DTYPE, device=DEVICE, generator=gen)
    value = torch.randn_like(key)
    slots = torch.randperm(num_blocks * BLOCK_SIZE, device=DEVICE, generator=gen)[:num_tokens]
    from leanserve.kernels import reference

    def triton_fn():
        ops.write_kv_cache(key, value, k_cache, v_cache, slots)

    def baseline_fn():
        reference.write_kv_cache(key, value, k_cache, v_cache, slots)

    t_ms = event_ms(triton_fn, iters, warmup)
    b_ms = event_ms(baseline_fn, iters, warmup)
    moved = 2 * 2 * key.numel() * DTYPE.itemsize + slots.numel() * 8  # read K,V + write K,V
    config = f"{num_tokens} tokens KV{kv_heads} D{head_dim}"
    return _result("write_kv", config, t_ms, b_ms, moved, 0, copy_gbps, 0.0)


def bench_rotary_write(ops, num_tokens, heads, kv_heads, head_dim, warmup, iters, copy_gbps):
    """``write_kv_cache_rotary`` (one launch) against ``apply_rotary`` then ``write_kv_cache`` (the two it
    replaced), each call's share of a CUDA graph of ``GRAPH_LAYERS`` calls, each on its own tensors as a
    model's layers are: at decode sizes the launches, not the bytes, are the cost."""
    from leanserve.kernels.fused_layers import apply_rotary

    gen = torch.Generator(device=DEVICE).manual_seed(3)
    num_blocks = 4 * max(num_tokens, BLOCK_SIZE) // BLOCK_SIZE
    positions = torch.randint(0, 2048, (num_tokens,), device=DEVICE, generator=gen)
    cos = torch.rand(2048, head_dim // 2, device=DEVICE, generator=gen)
    sin = torch.rand(2048, head_dim // 2, device=DEVICE, generator=gen)

    def layer():
        k_cache = torch.zeros((num_blocks, BLOCK_SIZE, kv_heads, head_dim), dtype=DTYPE, device=DEVICE)
        q = torch.randn(num_tokens, heads, head_dim, dtype=DTYPE, device=DEVICE, generator=gen)
        key = torch.randn(num_tokens, kv_heads, head_dim, dtype=DTYPE, device=DEVICE, generator=gen)
        slots = torch.randperm(num_blocks * BLOCK_SIZE, device=DEVICE, generator=gen)[:num_tokens]
        return q, key, torch.randn_like(key), k_cache, torch.zeros_like(k_cache), slots

    layers = [layer() for _ in range(GRAPH_LAYERS)]

    def fused(q, key, value, k_cache, v_cache, slots):
        ops.write_kv_cache_rotary(q, key, value, positions, cos, sin, k_cache, v_cache, slots)

    def apart(q, key, value, k_cache, v_cache, slots):
        apply_rotary(q, key, positions, cos, sin)
        ops.write_kv_cache(key, value, k_cache, v_cache, slots)

    t_ms = graph_us([lambda a=a: fused(*a) for a in layers], iters) / 1000
    b_ms = graph_us([lambda a=a: apart(*a) for a in layers], iters) / 1000
    q, key = layers[0][:2]
    moved = (2 * q.numel() + 4 * key.numel()) * DTYPE.itemsize  # q and k read and written, k and v cached
    config = f"{num_tokens} tokens H{heads}/KV{kv_heads} D{head_dim} (vs rotary + write, in a graph)"
    return _result("rotary_write_kv", config, t_ms, b_ms, moved, 0, copy_gbps, 0.0)


def _result(kernel, config, t_ms, b_ms, nbytes, flops, copy_gbps, err) -> Result:
    gbps = nbytes / t_ms / 1e6
    return Result(
        kernel, config, round(t_ms, 4), round(b_ms, 4), round(b_ms / t_ms, 2), round(gbps, 1),
        round(100 * gbps / copy_gbps, 1), round(flops / t_ms / 1e9, 1), err,
    )


def print_table(results: list[Result]) -> None:
    header = f"{'kernel':<9} {'config':<58} {'triton ms':>10} {'base ms':>9} {'speedup':>8} " \
             f"{'GB/s':>8} {'%copy':>6} {'TFLOP/s':>8} {'max err':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.kernel:<9} {r.config:<58} {r.triton_ms:>10.4f} {r.baseline_ms:>9.4f} {r.speedup:>8.2f} "
            f"{r.gbps:>8.1f} {r.pct_of_copy:>6.1f} {r.tflops:>8.1f} {r.max_abs_err:>8.1e}"
        )


def all_kernels(ops, w: int, n: int, copy_gbps: float) -> list[Result]:
    return [
        bench_decode(ops, 64, 4096, 32, 8, 128, w, n, copy_gbps),
        bench_decode(ops, 64, 4096, 32, 8, 128, w, n, copy_gbps, parts=1),
        bench_decode(ops, 256, 1024, 32, 8, 128, w, n, copy_gbps),
        bench_decode(ops, 4, 32768, 32, 8, 128, w, n, copy_gbps),  # few long sequences: split-KV
        bench_decode(ops, 4, 32768, 32, 8, 128, w, n, copy_gbps, parts=1),
        # Decode graphs of a 1B model (TinyLlama shape): launches sized for max_model_len 2048.
        *[bench_decode(ops, s, 512, 32, 4, 64, w, n, copy_gbps, parts=p, max_context=2048)
          for s in (1, 8) for p in (None, 1, 2, 4, 8, 16)],
        bench_prefill(ops, 8, 2048, 0, 32, 8, 128, w, n, copy_gbps),
        bench_prefill(ops, 4, 512, 4096, 32, 8, 128, w, n, copy_gbps),
        bench_write(ops, 8192, 8, 128, w, n, copy_gbps),
        bench_write(ops, 64, 8, 128, w, n, copy_gbps),
        # the decode step's rotary + KV write at TinyLlama's heads, batch 1 and 64
        bench_rotary_write(ops, 1, 32, 4, 64, w, n, copy_gbps),
        bench_rotary_write(ops, 64, 32, 4, 64, w, n, copy_gbps),
    ]


def decode_graph_sweep(ops, w: int, n: int, copy_gbps: float) -> list[Result]:
    """TinyLlama's decode launches inside a graph sized for 2048 tokens, by the shortest partition the
    split may cut a context into (``MIN_PARTITION_TOKENS``), at 512 and 2048 live tokens."""
    from leanserve.kernels import paged_attention

    default = paged_attention.MIN_PARTITION_TOKENS
    results = []
    try:
        for seqs in (1, 8):
            for ctx in (512, 2048):
                results.append(bench_decode(ops, seqs, ctx, 32, 4, 64, w, n, copy_gbps, parts=1, max_context=2048))
                for tokens in (128, 256, 512, 1024):
                    paged_attention.MIN_PARTITION_TOKENS = tokens
                    results.append(bench_decode(ops, seqs, ctx, 32, 4, 64, w, n, copy_gbps, max_context=2048,
                                                note=f" min{tokens}"))
    finally:
        paged_attention.MIN_PARTITION_TOKENS = default
    return results


def long_context_sweep(ops, w: int, n: int, copy_gbps: float) -> list[Result]:
    """Few long contexts (4 x 32k, Llama-8B heads) by partition count: the split-KV case
    (``choose_num_partitions`` was retuned from it: 0.164 ms at its old 9 partitions, 0.134-0.139 at
    16-32; RESULTS.md)."""
    return [bench_decode(ops, 4, 32768, 32, 8, 128, w, n, copy_gbps, parts=p) for p in (None, 4, 8, 16, 32, 64)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--decode-graph-sweep", action="store_true",
                        help="only the 1B model's graph-sized decode launches, by the minimum partition length")
    parser.add_argument("--long-context-sweep", action="store_true",
                        help="only 4 x 32k-token decode, by partition count")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/kernels.py: no CUDA device, nothing to benchmark (the kernels need a GPU).")
        print(json.dumps({"skipped": "no CUDA device"}))
        return 0
    from leanserve.kernels import backend

    if not backend.triton_available():
        print("benchmarks/kernels.py: triton is not importable, nothing to benchmark.")
        print(json.dumps({"skipped": "triton not importable"}))
        return 0
    ops = backend.get_attention_ops(torch.device("cuda"))
    w, n = args.warmup, args.iters
    copy_gbps = measure_copy_gbps(n)
    if args.decode_graph_sweep:
        results = decode_graph_sweep(ops, w, n, copy_gbps)
    elif args.long_context_sweep:
        results = long_context_sweep(ops, w, n, copy_gbps)
    else:
        results = all_kernels(ops, w, n, copy_gbps)
    name = torch.cuda.get_device_name()
    print(f"device: {name}  copy bandwidth: {copy_gbps:.0f} GB/s  dtype: {DTYPE}  block_size: {BLOCK_SIZE}")
    print_table(results)
    summary = {
        "device": name,
        "copy_gbps": round(copy_gbps, 1),
        "dtype": str(DTYPE),
        "results": [asdict(r) for r in results],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
