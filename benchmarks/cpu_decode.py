"""A CPU decode step's forward: the flat loop (``model/cpu_decode.py``) against the layer modules.

    python benchmarks/cpu_decode.py [--model DIR] [--context 100] [--batches 1,16] [--rounds 5]

Loads the model as the server does (the embedded one by default; pass an AWQ folder for INT4) and
captures the inputs of one decode-only step of ``batch`` sequences with ``--context`` tokens cached
(``decode_step.decode_batch``: a lone sequence's blocks in order, a batch's shuffled). Then, in
``--rounds`` alternating rounds, it times ``model.forward`` (which takes the flat loop) and
``model.forward_layers`` on those same inputs, and checks the two give equal hidden states. The floor
is the decoder's linear weights as served (``weight_memory``) over the host's read bandwidth, measured
here with a sum over 512 MB. The load average is printed beside every figure; the last line is one JSON
object.
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
from decode_step import decode_batch  # noqa: E402

from leanserve.engine.config import EngineConfig  # noqa: E402
from leanserve.engine.llm_engine import LLMEngine  # noqa: E402
from leanserve.model.runner import ModelRunner, StepSeq  # noqa: E402
from leanserve.quant.evaluate import weight_memory  # noqa: E402


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


def capture_forward_inputs(runner: ModelRunner, seqs: list[StepSeq]) -> tuple:
    """Run one step of ``seqs`` through ``runner`` and return the arguments it gave ``model.forward``."""
    captured: list[tuple] = []
    model = runner.model
    real = model.forward
    model.forward = lambda *a: captured.append(a) or real(*a)
    try:
        runner.execute(seqs)
    finally:
        del model.forward
    return captured[0]


def decode_inputs(engine: LLMEngine, batch: int, context: int) -> tuple:
    """The forward inputs of a decode step of ``batch`` sequences with ``context`` tokens cached. A lone
    sequence's blocks are in order (the attention reads a view), a batch's shuffled (it gathers), as in
    serving."""
    seqs = decode_batch(batch, context + 1, engine.config.block_size, engine.model_config.vocab_size,
                        shuffle=batch > 1)
    return capture_forward_inputs(engine.runner, seqs)


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
    weights = weight_memory(model).linear_bytes
    gbps = read_gbps()
    floor_ms = weights / gbps / 1e6
    matmul = str(engine.cpu_matmul_dtype).removeprefix("torch.")
    print(f"decoder linears {weights / 1e6:.1f} MB ({matmul} where not quantized), read {gbps:.1f} GB/s -> floor "
          f"{floor_ms:.2f} ms a step ({torch.get_num_threads()} threads, {load()})", flush=True)
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
    print(json.dumps({"model": args.model or "embedded", "cpu_matmul_dtype": matmul, "context": args.context,
                      "floor_ms": round(floor_ms, 3), "read_gbps": round(gbps, 1), "threads": torch.get_num_threads(),
                      "load_avg": round(os.getloadavg()[0], 2), **results}))


if __name__ == "__main__":
    main()
