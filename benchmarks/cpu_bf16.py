"""bf16 against fp32 decoder weights on the CPU (``engine.cpu_matmul_dtype``): speed and quality, side by side.

    python benchmarks/cpu_bf16.py [--model DIR] [--rounds 5] [--eval-tokens 4096]

Loads the model (the embedded one by default) twice through the engine, with the decoder's linears
packed in fp32 and in bf16; the LM head, norms, attention and the residual stream are fp32 in both.
Then:

- speed: the forward of three captured steps, each timed on both engines in alternating rounds (median
  of medians): a batch-1 decode, a batch-16 decode (100-token contexts), and a mixed step (those 16
  decodes beside a fresh 240-token prompt, a full 256-token step budget);
- quality: perplexity on the held-out last 20% of each text in ``--data-dir`` (the ``leanserve eval``
  windows), with greedy top-1 agreement and mean KL(fp32 || bf16) on the same positions.

It says whether this CPU has bf16 instructions (what ``auto`` reads, beside whether oneDNN runs bf16 at
all); without them the bf16 figures are oneDNN's emulation. The load average is printed beside every
figure; the step times and the perplexities are drawn in ``--plot`` (default
``benchmarks/results/cpu_bf16.png``); the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import leanserve  # noqa: E402, F401, I001  (before torch: the OpenMP settings the server runs with)
import torch  # noqa: E402
from cpu_decode import capture_forward_inputs, decode_inputs, load, median_ms  # noqa: E402
from decode_step import decode_batch  # noqa: E402

from leanserve.engine.config import EngineConfig  # noqa: E402
from leanserve.engine.llm_engine import LLMEngine  # noqa: E402
from leanserve.model.layers import cpu_has_native_bf16  # noqa: E402
from leanserve.model.runner import StepSeq  # noqa: E402
from leanserve.model.sampler import SampleRequest  # noqa: E402
from leanserve.quant.evaluate import eval_windows, score  # noqa: E402
from leanserve.sampling_params import SamplingParams  # noqa: E402

DTYPES = ("float32", "bfloat16")


def mixed_inputs(engine: LLMEngine, decodes: int, context: int, prompt_len: int) -> tuple:
    """The model inputs of a step with ``decodes`` decodes at ``context`` beside a fresh prompt."""
    bs, vocab = engine.config.block_size, engine.model_config.vocab_size
    seqs = decode_batch(decodes, context + 1, bs, vocab)  # blocks 0 .. decodes * per_seq - 1
    first = decodes * -(-(context + 1) // bs)
    prompt = torch.randint(0, vocab, (prompt_len,), generator=torch.Generator().manual_seed(7)).tolist()
    table = list(range(first, first + prompt_len // bs + 1))
    params = SamplingParams(temperature=0, max_tokens=2)
    seqs.append(StepSeq(prompt, 0, prompt_len, table, prompt_len, SampleRequest(params, prompt, prompt_len)))
    return capture_forward_inputs(engine.runner, seqs)


def plot(speed: dict, quality: dict, native: bool, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), gridspec_kw={"width_ratios": [3, 2]})
    names = list(speed)
    xs = range(len(names))
    for offset, (key, label) in zip((-0.2, 0.2), (("fp32_ms", "fp32 weights"), ("bf16_ms", "bf16 weights")),
                                    strict=True):
        bars = left.bar([x + offset for x in xs], [speed[n][key] for n in names], width=0.4, label=label)
        left.bar_label(bars, fmt="%.1f", fontsize=8)
    left.set_xticks(list(xs), [n.replace("_", " ") for n in names], fontsize=8)
    left.set_ylabel("forward of one step (ms)")
    left.set_yscale("log")
    left.set_title(f"step time, {torch.get_num_threads()} threads (bf16 instructions: {native})")
    left.legend()
    texts = list(quality)
    for offset, (key, label) in zip((-0.2, 0.2), (("ppl_fp32", "fp32 weights"), ("ppl_bf16", "bf16 weights")),
                                    strict=True):
        bars = right.bar([x + offset for x in range(len(texts))], [quality[t][key] for t in texts], width=0.4,
                         label=label)
        right.bar_label(bars, fmt="%.2f", fontsize=8)
    right.set_xticks(range(len(texts)), [f"{t}\n(KL {quality[t]['mean_kl']:.5f})" for t in texts], fontsize=8)
    right.set_ylabel("held-out perplexity")
    right.set_title("quality")
    fig.suptitle("Decoder linears in bf16 against fp32 on the CPU (benchmarks/cpu_bf16.py)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f"plot: {path}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded model)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--iters", type=int, default=20, help="timed calls per engine, step and round")
    p.add_argument("--eval-tokens", type=int, default=4096, help="tokens scored per text")
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--plot", type=Path, default=REPO / "benchmarks" / "results" / "cpu_bf16.png")
    args = p.parse_args()

    native = cpu_has_native_bf16()
    print(f"bf16 instructions on this CPU: {native} ({torch.get_num_threads()} threads, {load()})", flush=True)
    engines = {}
    for dtype in DTYPES:
        print(f"loading {args.model or 'the embedded model'} with {dtype} matmul weights ... ({load()})", flush=True)
        config = EngineConfig(model=args.model, device="cpu", enable_prefix_caching=False, cpu_matmul_dtype=dtype)
        engines[dtype] = LLMEngine(config)

    steps = {
        "decode_b1": lambda e: decode_inputs(e, 1, 100),
        "decode_b16": lambda e: decode_inputs(e, 16, 100),
        "mixed_16x1_plus_240": lambda e: mixed_inputs(e, 16, 100, 240),
    }
    speed = {}
    for name, make in steps.items():
        inputs = {dtype: make(engine) for dtype, engine in engines.items()}
        times: dict[str, list[float]] = {dtype: [] for dtype in DTYPES}
        with torch.inference_mode():
            for r in range(args.rounds):
                for dtype, engine in engines.items():
                    call = functools.partial(engine.runner.model, *inputs[dtype])
                    call()
                    times[dtype].append(median_ms(call, args.iters))
                print(f"  {name} round {r}: " + ", ".join(f"{d} {times[d][-1]:.2f} ms" for d in DTYPES)
                      + f" ({load()})", flush=True)
        fp32, bf16 = (statistics.median(times[d]) for d in DTYPES)
        speed[name] = {"fp32_ms": round(fp32, 3), "bf16_ms": round(bf16, 3), "bf16_vs_fp32": round(bf16 / fp32, 3)}
        print(f"{name}: fp32 {fp32:.2f} ms, bf16 {bf16:.2f} ms, bf16/fp32 {bf16 / fp32:.3f} ({load()})", flush=True)

    quality = {}
    exact, bf16_model = engines["float32"].runner.model, engines["bfloat16"].runner.model
    tokenizer = engines["float32"].tokenizer
    for path in sorted(args.data_dir.glob("*.txt")):
        windows = eval_windows(tokenizer, path, args.eval_tokens, 512, 0.2)
        nll, count, base_nll, agree, kl = score(bf16_model, windows, exact, torch.device("cpu"))
        q = {"ppl_fp32": round(math.exp(base_nll / count), 3), "ppl_bf16": round(math.exp(nll / count), 3),
             "top1_agreement": round(agree / count, 4), "mean_kl": round(kl / count, 5), "tokens": count}
        quality[path.stem] = q
        print(f"{path.stem}: ppl fp32 {q['ppl_fp32']}, bf16 {q['ppl_bf16']}, top-1 agreement "
              f"{q['top1_agreement']:.2%}, mean KL {q['mean_kl']} over {count} tokens ({load()})", flush=True)

    plot(speed, quality, native, args.plot)
    print(json.dumps({"model": args.model or "embedded", "native_bf16": native, "threads": torch.get_num_threads(),
                      "load_avg": round(os.getloadavg()[0], 2), "speed": speed, "quality": quality}))


if __name__ == "__main__":
    main()
