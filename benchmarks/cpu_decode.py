"""A CPU decode step's forward: the flat loop (``model/cpu_decode.py``) against the layer modules.

    python benchmarks/cpu_decode.py [--model DIR] [--context 100] [--batches 1,16] [--rounds 5]

Loads the model as the server does (the embedded one by default; pass an AWQ folder for INT4), prefills
``batch`` random prompts of ``--context`` tokens, and captures one decode-only step's inputs. Then, in
``--rounds`` alternating rounds, it times ``model.forward`` (which takes the flat loop) and
``model.forward_layers`` on those same inputs, and checks the two give equal hidden states. The floor
is the step's weight bytes (the decoder layers', not the embedding table or the LM head) over the host's
read bandwidth, measured here with a sum over 512 MB. The load average is printed beside every figure; the last
line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import leanserve  # noqa: E402, F401, I001  (before torch: the OpenMP settings the server runs with)
import torch  # noqa: E402

from leanserve.engine.config import EngineConfig  # noqa: E402
from leanserve.engine.llm_engine import LLMEngine  # noqa: E402
from leanserve.model.layers import Linear  # noqa: E402
from leanserve.model.runner import StepSeq  # noqa: E402
from leanserve.model.sampler import SampleRequest  # noqa: E402
from leanserve.sampling_params import SamplingParams  # noqa: E402


def load() -> str:
    return f"load {os.getloadavg()[0]:.2f}"


def median_ms(fn, iters: int) -> float:
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def read_gbps() -> float:
    """Bytes read per second by a sum over 512 MB: well past the last-level cache (32 MB on the 2-core
    host). There it read ~42 GB/s, where a 512 MB ``copy_`` moved ~23 GB/s (each byte read and written)."""
    data = torch.ones(128 << 20)
    ms = min(median_ms(data.sum, 3) for _ in range(3))
    return data.numel() * data.element_size() / ms / 1e6


def linear_bytes(model: torch.nn.Module) -> int:
    """Bytes of every decoder layer's weights as they are served (oneDNN-packed fp32 weights are kept
    outside the parameters): what one forward must read from memory."""
    layers = model.model.layers
    tensors = [*layers.parameters(), *layers.buffers()]
    tensors += [m.packed for m in layers.modules() if isinstance(m, Linear) and m.packed is not None]
    return sum(t.numel() * t.element_size() for t in tensors)


def decode_inputs(engine: LLMEngine, batch: int, context: int) -> tuple:
    """Prefill ``batch`` random prompts, then capture the model inputs of their first decode step."""
    runner, bs = engine.runner, engine.config.block_size
    gen = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=2)
    blocks_each = (context + 1) // bs + 1
    seqs = []
    for i in range(batch):
        tokens = torch.randint(0, engine.model_config.vocab_size, (context,), generator=gen).tolist()
        table = list(range(i * blocks_each, (i + 1) * blocks_each))
        seqs.append(StepSeq(tokens, 0, context, table, context, SampleRequest(params, tokens, context)))
    for seq, result in zip(seqs, runner.execute(seqs), strict=True):
        seq.token_ids.append(result.token_id)
        seq.num_computed, seq.num_new = context, 1
    captured: list[tuple] = []
    model = runner.model
    real = model.forward
    model.forward = lambda *a: captured.append(a) or real(*a)
    try:
        runner.execute(seqs)
    finally:
        del model.forward
    return captured[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--context", type=int, default=100)
    p.add_argument("--batches", default="1,16")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=60, help="timed calls per path and round")
    args = p.parse_args()

    print(f"loading {args.model or 'the embedded model'} ... ({load()})", flush=True)
    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", enable_prefix_caching=False))
    model = engine.runner.model
    weights = linear_bytes(model)
    gbps = read_gbps()
    floor_ms = weights / gbps / 1e6
    print(f"decoder weights {weights / 1e6:.1f} MB, read {gbps:.1f} GB/s -> floor {floor_ms:.2f} ms a step "
          f"({torch.get_num_threads()} threads, {load()})", flush=True)
    results = {}
    for batch in [int(b) for b in args.batches.split(",")]:
        inputs = decode_inputs(engine, batch, args.context)
        with torch.inference_mode():
            equal = torch.equal(model(*inputs), model.forward_layers(*inputs))
            for _ in range(10):
                model(*inputs), model.forward_layers(*inputs)
            flat, layers = [], []
            for r in range(args.rounds):
                flat.append(median_ms(functools.partial(model, *inputs), args.iters))
                layers.append(median_ms(functools.partial(model.forward_layers, *inputs), args.iters))
                print(f"  batch {batch:3d} round {r}: flat {flat[-1]:.3f} ms, layers {layers[-1]:.3f} ms ({load()})",
                      flush=True)
        f, lay = statistics.median(flat), statistics.median(layers)
        print(f"batch {batch:3d}: flat {f:.3f} ms, layers {lay:.3f} ms, flat/layers {f / lay:.3f}, "
              f"floor/flat {floor_ms / f:.2f}, equal hidden states: {equal} ({load()})", flush=True)
        results[f"batch{batch}"] = {"flat_ms": round(f, 3), "layers_ms": round(lay, 3),
                                    "ratio": round(f / lay, 3), "equal": equal}
    print(json.dumps({"model": args.model or "embedded", "context": args.context, "floor_ms": round(floor_ms, 3),
                      "read_gbps": round(gbps, 1), "threads": torch.get_num_threads(),
                      "load_avg": round(os.getloadavg()[0], 2), **results}))


if __name__ == "__main__":
    main()
