"""A short request's time to first token while a long prompt is being prefilled (engine level).

    python benchmarks/long_prompt_ttft.py [--model DIR] [--long 6000] [--short 3] [--after-chunks 2]
                                          [--max-num-batched-tokens N]

Loads the model as the server does (the embedded one by default), adds a ``--long``-token prompt, runs
``--after-chunks`` steps of its chunked prefill, then adds a ``--short``-token prompt and steps until
both finish. It prints the short request's TTFT (seconds and steps) and the step at which the long one
finished, with the load average. Before the scheduler left waiting requests half the step budget, the
short one waited for the whole prefill (RESULTS.md). The last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import leanserve  # noqa: E402, F401, I001  (before torch: the OpenMP settings the server runs with)

from leanserve.engine.config import EngineConfig  # noqa: E402
from leanserve.engine.llm_engine import LLMEngine  # noqa: E402
from leanserve.sampling_params import SamplingParams  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder or GGUF (default: the embedded model)")
    p.add_argument("--long", type=int, default=6000, help="tokens in the long prompt")
    p.add_argument("--short", type=int, default=3, help="tokens in the short prompt")
    p.add_argument("--after-chunks", type=int, default=2, help="long-prompt steps before the short one arrives")
    p.add_argument("--max-num-batched-tokens", type=int, default=None, help="step budget (default: the engine's)")
    args = p.parse_args()

    print(f"loading {args.model or 'the embedded model'} ...", flush=True)
    engine = LLMEngine(EngineConfig(model=args.model, device="cpu", enable_prefix_caching=False,
                                    max_num_batched_tokens=args.max_num_batched_tokens))
    vocab = engine.runner.model.config.vocab_size
    # Token ids spread over the vocabulary, away from the special tokens at its start.
    long_prompt = [(i * 7919) % (vocab - 200) + 100 for i in range(args.long)]
    short_prompt = [(i * 104729) % (vocab - 200) + 100 for i in range(args.short)]
    greedy = SamplingParams(max_tokens=2, temperature=0.0)
    engine.add_request("long", long_prompt, greedy)
    for _ in range(args.after_chunks):
        engine.step()
    start = time.perf_counter()
    engine.add_request("short", short_prompt, greedy)
    steps = 0
    first_token: dict[str, tuple[float, int]] = {}
    finished: dict[str, int] = {}
    while engine.has_unfinished_requests():
        outputs = engine.step()
        steps += 1
        for out in outputs:
            if out.new_token_ids and out.request_id not in first_token:
                first_token[out.request_id] = (time.perf_counter() - start, steps)
            if out.finished:
                finished[out.request_id] = steps
    ttft_s, ttft_steps = first_token["short"]
    load = os.getloadavg()[0]
    print(f"short request TTFT {ttft_s:.2f} s ({ttft_steps} steps); the long prompt finished at step "
          f"{finished['long']} (load {load:.2f})")
    print(json.dumps({"long_tokens": args.long, "short_tokens": args.short, "short_ttft_s": round(ttft_s, 3),
                      "short_ttft_steps": ttft_steps, "long_finished_step": finished["long"],
                      "max_num_batched_tokens": engine.scheduler.config.max_num_batched_tokens,
                      "load_avg_1m": load}))


if __name__ == "__main__":
    main()
