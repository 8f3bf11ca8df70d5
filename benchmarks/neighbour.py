"""How much throughput a busy neighbour costs: the same serving load, quiet and beside a CPU hog.

Starts one ``leanserve serve`` (the embedded model by default), runs the serving benchmark's closed
loop once on a quiet host, then again while ``--hogs`` processes spin on the CPU (a neighbour
tenant), and prints the ratio. The brief's bar: lose at most 30%. The engine's thread tuner
(engine/cpu_threads.py) is what keeps the loss small; ``--set engine.num_threads=2`` pins the thread
count to show what happens without it. Last line: one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time

import serving


def spin(stop_at: float) -> None:
    while time.time() < stop_at:
        pass


def mean_summary(summaries: list[dict]) -> dict:
    keys = ("output_tok_s", "ttft_p50_ms")
    return {k: round(sum(s[k] for s in summaries) / len(summaries), 2) for k in keys}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--num-requests", type=int, default=48)
    p.add_argument("--hogs", type=int, default=1, help="busy-looping neighbour processes")
    p.add_argument("--rounds", type=int, default=2, help="quiet/busy pairs")
    args = p.parse_args()

    server = serving.ServerProcess(args.model, None, dict(s.split("=", 1) for s in args.set), serving.free_port())
    server.wait_ready()
    try:
        seeds = iter(range(100))

        def load() -> dict:
            # A new seed each run: the same prompts again would be served from the prefix cache.
            point = serving.parse_args(["--url", server.url, "--concurrency", str(args.concurrency),
                                        "--num-requests", str(args.num_requests), "--seed", str(next(seeds))])
            summary = serving.run(point)
            serving.print_table(summary)
            return summary

        def busy_load() -> dict:
            hogs = [multiprocessing.Process(target=spin, args=(time.time() + 600,)) for _ in range(args.hogs)]
            for hog in hogs:
                hog.start()
            try:
                time.sleep(1.0)
                return load()
            finally:
                for hog in hogs:
                    hog.terminate()

        # Alternate quiet and busy runs so that drift (warm-up, other tenants) hits both alike.
        runs = [(load(), busy_load()) for _ in range(args.rounds)]
    finally:
        server.stop()
    quiet = mean_summary([q for q, _ in runs])
    busy = mean_summary([b for _, b in runs])
    ratio = busy["output_tok_s"] / quiet["output_tok_s"]
    print(f"busy/quiet output tok/s: {ratio:.2f} (loss {1 - ratio:.0%}) with {args.hogs} neighbour process(es)")
    print(json.dumps({
        "quiet_tok_s": quiet["output_tok_s"], "busy_tok_s": busy["output_tok_s"],
        "busy_vs_quiet": round(ratio, 3), "loss": round(1 - ratio, 3), "hogs": args.hogs,
        "quiet_ttft_p50_ms": quiet["ttft_p50_ms"], "busy_ttft_p50_ms": busy["ttft_p50_ms"],
        "settings": args.set, "load_avg": [round(x, 2) for x in os.getloadavg()],
    }))


if __name__ == "__main__":
    main()
