"""The busy-neighbour question without HTTP: the engine's decode loop, quiet and beside a busy process.

Batch-16 decode steps of the embedded model (fp32, ~130-token contexts) through ``ModelRunner``, in
three ways: 2 OpenMP threads, 1 thread, and two 1-thread workers on half the batch each (data
parallel: no OpenMP barrier, so a worker losing its core does not stall the other). Each is timed on
a quiet host and beside one busy-looping process, alternated twice.

It shows the floor under ``benchmarks/neighbour.py``'s ratio: with a core taken, the engine can at
best run 1 thread undisturbed, so it loses at least 1 - (1 thread, busy) / (2 threads, quiet).

    python benchmarks/neighbour_loop.py [--steps 20]
"""

from __future__ import annotations

# Before torch: leanserve sets the OpenMP wait policy and spin count the server runs with.
import leanserve  # noqa: F401

# isort: split
import argparse
import json
import multiprocessing
import os
import threading
import time

import torch
from decode_step import decode_batch
from neighbour import spin

from leanserve.model.embedded import resolve_model_path
from leanserve.model.loader import load_model
from leanserve.model.runner import ModelRunner, StepSeq, allocate_kv_cache

BATCH, CONTEXT, BLOCK = 16, 130, 16


def omp_tok_s(runner: ModelRunner, seqs: list[StepSeq], steps: int, threads: int) -> float:
    torch.set_num_threads(threads)
    runner.execute(seqs)
    start = time.perf_counter()
    for _ in range(steps):
        runner.execute(seqs)
    return len(seqs) * steps / (time.perf_counter() - start)


def halves_tok_s(runners: list[ModelRunner], seqs: list[StepSeq], steps: int) -> float:
    """Two Python threads, one half of the batch each, meeting at a barrier after every step."""
    torch.set_num_threads(1)
    half = len(seqs) // 2
    parts = (seqs[:half], seqs[half:])
    barrier = threading.Barrier(2)

    def worker(runner: ModelRunner, part: list[StepSeq]) -> None:
        for _ in range(steps):
            runner.execute(part)
            barrier.wait()

    for runner, part in zip(runners, parts):  # warm-up, one at a time
        runner.execute(part)
    threads = [threading.Thread(target=worker, args=(r, p)) for r, p in zip(runners, parts)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return len(seqs) * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=20)
    args = p.parse_args()
    device = torch.device("cpu")
    model = load_model(resolve_model_path(None), device, torch.float32)
    blocks = BATCH * (-(-CONTEXT // BLOCK))
    kv = allocate_kv_cache(model.config, blocks, BLOCK, torch.float32, device)
    seqs = decode_batch(BATCH, CONTEXT, BLOCK, model.config.vocab_size)  # disjoint, shuffled blocks
    runner, half_a, half_b = (ModelRunner(model, kv, BLOCK, device) for _ in range(3))
    rows = []
    for busy in (False, True, False, True):
        hog = None
        if busy:
            hog = multiprocessing.Process(target=spin, args=(time.time() + 300,))
            hog.start()
            time.sleep(0.5)
        row = dict(
            busy=busy,
            omp2=omp_tok_s(runner, seqs, args.steps, 2),
            omp1=omp_tok_s(runner, seqs, args.steps, 1),
            halves=halves_tok_s([half_a, half_b], seqs, args.steps),
            load=os.getloadavg()[0],
        )
        if hog is not None:
            hog.terminate()
            hog.join()
        rows.append(row)
        print(f"{'busy ' if busy else 'quiet'}: 2 threads {row['omp2']:5.0f} tok/s, 1 thread {row['omp1']:5.0f}, "
              f"two 1-thread halves {row['halves']:5.0f}   [load {row['load']:.2f}]", flush=True)
    quiet_best = max(r["omp2"] for r in rows if not r["busy"])
    busy_best = max(max(r["omp1"], r["omp2"], r["halves"]) for r in rows if r["busy"])
    print(f"floor on the loss beside a neighbour: 1 - {busy_best:.0f} / {quiet_best:.0f} = "
          f"{100 * (1 - busy_best / quiet_best):.0f}%")
    print(json.dumps({"rows": rows, "loss_floor": 1 - busy_best / quiet_best}))


if __name__ == "__main__":
    main()
