"""Offline throughput: our engine against transformers' static and continuous batching (issue 2, item 9).

One seeded workload of real text (slices of a book, tokenized, cut to drawn prompt lengths; fixed output
lengths with EOS ignored) runs through three systems in one process, one after the other:

1. leanserve's ``LLMEngine``: every request submitted at once, ``step()`` until done.
2. transformers ``generate`` with static batches of 8 in submission order, left-padded; a batch runs
   until its longest member is done, and only each member's requested tokens count as useful output.
3. transformers continuous batching (``ContinuousBatchingManager``), where the installed version has it.
   On CPU it can only use sdpa or eager attention, which attend over the whole batch as one sequence under a
   block-diagonal mask: a step costs (query tokens in the batch) x (cached tokens of every request in it), so
   it slows down quadratically with the number of concurrent requests (see RESULTS.md, "Offline throughput").
   The phase is therefore capped (``--hf-continuous-limit``): past the cap it is stopped, and its rate is the
   tokens it had generated, finished requests or not, over the time it ran.

It also reports the engine's overhead share: the part of step time that is not the model's forward pass
(layers + LM head), i.e. scheduling, block bookkeeping, input layout, sampling and detokenizing.

Prints a table and, as the last line, one JSON object. Load averages go beside every figure because
the machine is shared and timings move with it.

Usage: python benchmarks/throughput.py [--quick] [--num-requests N] [--seed S] [--model PATH] [--data FILE]
           [--threads N] [--kv-cache-memory X] [--skip-hf-static] [--skip-hf-continuous]
           [--hf-continuous-limit SECONDS]
"""

from __future__ import annotations

# Before torch: leanserve sets the OpenMP wait policy and spin count the server runs with.
import leanserve  # noqa: F401

# isort: split
import argparse
import json
import os
import random
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from leanserve.settings import parse_kv_cache_memory

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "pride_and_prejudice.txt"
HF_STATIC_BATCH = 8
HF_CONTINUOUS_LIMIT_S = 600.0


@dataclass
class Request:
    request_id: str
    prompt_ids: list[int]
    output_len: int


@dataclass
class Workload:
    num_requests: int
    prompt_range: tuple[int, int]
    output_range: tuple[int, int]
    seed: int
    data: str

    def describe(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Result:
    system: str
    requests: int
    output_tokens: int  # useful tokens: what the requests asked for
    wall_seconds: float
    load_before: float  # 1-minute load average when the phase started
    load_after: float
    extra: dict[str, Any]

    @property
    def tok_s(self) -> float:
        return self.output_tokens / self.wall_seconds


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def build_requests(tokenizer: Any, workload: Workload) -> list[Request]:
    """Draw lengths with a seeded RNG and cut each prompt from a random offset of the tokenized book."""
    text = Path(workload.data).read_text(encoding="utf-8")
    # Tokenizing the whole book once and slicing ids keeps every prompt real running text; the model's
    # length warning about the (never-fed) full sequence is irrelevant here.
    book = tokenizer(text, add_special_tokens=False)["input_ids"]
    lo_p, hi_p = workload.prompt_range
    if len(book) <= hi_p:
        raise ValueError(f"{workload.data} has {len(book)} tokens, fewer than the longest prompt ({hi_p})")
    rng = random.Random(workload.seed)
    requests = []
    for i in range(workload.num_requests):
        prompt_len = rng.randint(lo_p, hi_p)
        output_len = rng.randint(*workload.output_range)
        start = rng.randrange(0, len(book) - prompt_len)
        requests.append(Request(f"req-{i}", book[start : start + prompt_len], output_len))
    return requests


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class TimedModel:
    """Stands in for the runner's model and clocks the forward pass alone (layers + LM head).

    ``StepStats.forward_seconds`` times all of ``runner.execute``, which also lays out the batch and
    samples; the overhead the issue asks about counts those as engine work, so we need this finer clock.
    Wrapping from the outside keeps the engine code untouched.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.model = model
        self.device = device
        self.seconds = 0.0

    def _timed(self, fn: Callable[..., torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        sync(self.device)  # on CUDA the clock must include the queued kernels
        self.seconds += time.perf_counter() - start
        return out

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self._timed(self.model, *args, **kwargs)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._timed(self.model.compute_logits, hidden)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)


# ---- 1. our engine ------------------------------------------------------------------------------
def run_engine(
    model: str | None, requests: Sequence[Request], threads: int, kv_cache_memory: float | int | None = None
) -> Result:
    from leanserve.engine.config import EngineConfig
    from leanserve.engine.llm_engine import LLMEngine
    from leanserve.sampling_params import SamplingParams

    # Exact fp32, as transformers runs it here: the ratios measure the engine, not bf16 weights.
    config = EngineConfig(model=model, num_threads=threads, cpu_matmul_dtype="float32")
    if kv_cache_memory is not None:
        config.kv_cache_memory = kv_cache_memory
    engine = LLMEngine(config)

    def params(n: int) -> SamplingParams:
        # Greedy like the HF baselines; ignore_eos so every request produces exactly n tokens.
        return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    # Warm-up: first calls pay for allocator growth and kernel selection; keep them off the clock.
    for i, r in enumerate(requests[:2]):
        engine.add_request(f"warmup-{i}", r.prompt_ids[:32], params(4))
    while engine.has_unfinished_requests():
        engine.step()

    timed = TimedModel(engine.runner.model, engine.device)
    engine.runner.model = timed  # type: ignore[assignment]
    expected = {r.request_id: r.output_len for r in requests}
    produced = dict.fromkeys(expected, 0)
    step_s = forward_s = 0.0
    steps = 0
    load_before = load1()
    start = time.perf_counter()
    for r in requests:
        engine.add_request(r.request_id, r.prompt_ids, params(r.output_len))
    with tqdm(total=sum(expected.values()), desc="engine", unit="tok", file=sys.stderr) as bar:
        while engine.has_unfinished_requests():
            outputs = engine.step()
            stats = engine.last_step
            step_s += stats.step_seconds
            forward_s += stats.forward_seconds
            steps += 1
            new = 0
            for out in outputs:
                produced[out.request_id] += len(out.new_token_ids)
                new += len(out.new_token_ids)
            bar.update(new)
    wall = time.perf_counter() - start
    engine.runner.model = timed.model  # type: ignore[assignment]
    if produced != expected:
        wrong = {k: (produced[k], v) for k, v in expected.items() if produced[k] != v}
        raise RuntimeError(f"engine produced the wrong number of tokens (got, wanted): {list(wrong.items())[:5]}")
    model_s = timed.seconds
    return Result(
        "leanserve engine",
        len(requests),
        sum(produced.values()),
        wall,
        load_before,
        load1(),
        {
            "steps": steps,
            "step_seconds": round(step_s, 3),
            "runner_execute_seconds": round(forward_s, 3),
            "model_forward_seconds": round(model_s, 3),
            # The definition: everything in a step but the model's forward pass.
            "overhead_share": 1 - model_s / step_s,
            # Coarser split from StepStats alone: sampling and input layout count as "forward" here.
            "overhead_share_outside_runner": 1 - forward_s / step_s,
            # Time outside step() (our loop, add_request) counted too.
            "overhead_share_of_wall": 1 - model_s / wall,
            # As the scheduler resolved them (the token budget defaults by device).
            "max_num_seqs": engine.scheduler.config.max_num_seqs,
            "max_num_batched_tokens": engine.scheduler.config.max_num_batched_tokens,
        },
    )


# ---- 2. transformers static batching ------------------------------------------------------------
def load_hf(model_dir: Path, attn: str) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attn)
    return model.eval(), AutoTokenizer.from_pretrained(model_dir)


def left_pad(prompts: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


@torch.inference_mode()
def run_hf_static(model_dir: Path, requests: Sequence[Request], batch_size: int = HF_STATIC_BATCH) -> Result:
    model, tokenizer = load_hf(model_dir, "sdpa")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def generate(batch: Sequence[Request]) -> int:
        ids, mask = left_pad([r.prompt_ids for r in batch], pad_id)
        longest = max(r.output_len for r in batch)
        # min_new_tokens = max_new_tokens masks EOS, so the batch runs exactly to its longest member,
        # which is how generate serves a batch whose members asked for different lengths.
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=longest,
            min_new_tokens=longest,
            do_sample=False,
            pad_token_id=pad_id,
        )
        return out.shape[1] - ids.shape[1]

    generate(requests[:2])  # warm-up, off the clock
    batches = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    computed = 0  # tokens the batches generated, padding members included
    load_before = load1()
    start = time.perf_counter()
    with tqdm(total=sum(r.output_len for r in requests), desc="hf static", unit="tok", file=sys.stderr) as bar:
        for batch in batches:
            steps = generate(batch)
            if steps != max(r.output_len for r in batch):
                raise RuntimeError(f"generate ran {steps} steps, wanted {max(r.output_len for r in batch)}")
            computed += steps * len(batch)
            bar.update(sum(r.output_len for r in batch))
    wall = time.perf_counter() - start
    useful = sum(r.output_len for r in requests)
    return Result(
        f"hf generate, static batch {batch_size}",
        len(requests),
        useful,
        wall,
        load_before,
        load1(),
        {"generated_tokens_incl_wasted": computed, "useful_share": useful / computed},
    )


# ---- 3. transformers continuous batching --------------------------------------------------------
@torch.inference_mode()
def run_hf_continuous(
    model_dir: Path,
    requests: Sequence[Request],
    max_num_seqs: int,
    max_num_batched_tokens: int,
    limit_s: float | None = HF_CONTINUOUS_LIMIT_S,
) -> Result:
    from transformers import ContinuousBatchingConfig, GenerationConfig
    from transformers.generation.continuous_batching.utils import WorkloadHints

    model, _ = load_hf(model_dir, "sdpa")  # CB on CPU takes sdpa or paged|eager; flash needs CUDA
    # eos_token_id=-1 is transformers' own "no EOS" value (RequestState only keeps ids >= 0).
    gen_config = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(r.output_len for r in requests))
    page = ContinuousBatchingConfig().page_size
    cb_config = ContinuousBatchingConfig(
        # Same batching limits as our engine, so the comparison is about the implementation, not the knobs.
        max_requests_per_batch=max_num_seqs,
        max_batch_tokens=max_num_batched_tokens,
        # Room for every request at once (as our engine has), no more: left alone, CB takes 60% of the
        # free RAM on CPU (~12 GB here), which costs ~30 s of page faults and starves the shared machine.
        num_blocks=sum(-(-(len(r.prompt_ids) + r.output_len) // page) + 1 for r in requests),
        auto_switch_to_flash=False,
    )
    hints = WorkloadHints(
        max_prompt_length=max(len(r.prompt_ids) for r in requests),
        max_generated_length=max(r.output_len for r in requests),
        num_requests=len(requests),
    )

    def serve(
        manager: Any, batch: Sequence[Request], bar: tqdm | None, deadline: float | None = None
    ) -> tuple[dict[str, int], bool]:
        """Returns the tokens each finished request got, and whether the deadline cut the run short."""
        for r in batch:
            manager.add_request(r.prompt_ids, request_id=r.request_id, max_new_tokens=r.output_len, eos_token_id=-1)
        produced: dict[str, int] = {}
        while len(produced) < len(batch):
            if deadline is not None and time.perf_counter() > deadline:
                return produced, True
            result = manager.get_result(timeout=1)
            if result is None:
                if not manager.is_running():
                    raise RuntimeError("the continuous batching thread stopped before all requests finished")
                continue
            if result.error is not None:
                raise RuntimeError(f"request {result.request_id} failed: {result.error}")
            if result.is_finished():
                produced[result.request_id] = len(result.generated_tokens)
                if bar is not None:
                    bar.update(1)
        return produced, False

    def stop_and_count(manager: Any, produced: dict[str, int]) -> int:
        """Hard-stops the manager and adds the tokens of the requests it had not finished (it fails and returns
        them, generated tokens included) to those of the finished ones. The context manager's own stop on exit then
        only logs that the manager is not started."""
        manager.stop(block=True, hard_stop=True)
        unfinished = 0
        while (result := manager.get_result(timeout=0)) is not None:
            if result.request_id not in produced:
                unfinished += len(result.generated_tokens)
        return sum(produced.values()) + unfinished

    with model.continuous_batching_context_manager(
        generation_config=gen_config, continuous_batching_config=cb_config, workload_hints=hints
    ) as manager:
        warm = [Request(f"warmup-{i}", r.prompt_ids[:32], 4) for i, r in enumerate(requests[:2])]
        serve(manager, warm, None)  # off the clock, like the other two
        load_before = load1()
        start = time.perf_counter()
        deadline = start + limit_s if limit_s else None
        # Counted in finished requests: results only come back when a request is done, so a token count would
        # stand still for minutes while the first prompts are prefilled, and read as a far lower rate than the real one.
        with tqdm(total=len(requests), desc="hf continuous (finished)", unit="req", file=sys.stderr) as bar:
            produced, cut = serve(manager, requests, bar, deadline)
        if cut:
            output_tokens = stop_and_count(manager, produced)
        wall = time.perf_counter() - start
    expected = {r.request_id: r.output_len for r in requests}
    if not cut:
        output_tokens = sum(produced.values())
        if produced != expected:
            wrong = {k: (produced.get(k), v) for k, v in expected.items() if produced.get(k) != v}
            raise RuntimeError(f"continuous batching produced wrong lengths (got, wanted): {list(wrong.items())[:5]}")
    extra: dict[str, Any] = {
        k: getattr(cb_config, k) for k in ("max_requests_per_batch", "max_batch_tokens", "num_blocks", "page_size")
    }
    extra["stopped_at_limit_s"] = limit_s if cut else None
    extra["finished_requests"] = len(produced)
    name = f"hf continuous (cut at {limit_s:.0f}s)" if cut else "hf continuous batching"
    return Result(name, len(requests), output_tokens, wall, load_before, load1(), extra)


# ---- report -------------------------------------------------------------------------------------
def print_table(results: Sequence[Result]) -> None:
    header = f"{'system':<30} {'requests':>8} {'out tokens':>10} {'wall s':>8} {'out tok/s':>10} {'load avg':>11}"
    print(header)
    print("-" * len(header))
    for r in results:
        load = f"{r.load_before:.2f}->{r.load_after:.2f}"
        print(
            f"{r.system:<30} {r.requests:>8} {r.output_tokens:>10} {r.wall_seconds:>8.1f} {r.tok_s:>10.1f} {load:>11}"
        )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="24 requests, prompts 32-256, outputs 16-96")
    p.add_argument("--num-requests", type=int, default=None, help="default 128 (24 with --quick)")
    p.add_argument("--prompt-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument("--output-len", type=int, nargs=2, default=None, metavar=("MIN", "MAX"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="HF checkpoint folder; default: the embedded SmolLM2-135M")
    p.add_argument("--data", default=str(DEFAULT_DATA), help="a text file to cut prompts from")
    p.add_argument(
        "--kv-cache-memory",
        type=parse_kv_cache_memory,
        default=None,
        help="engine KV budget, as the server reads it (0.5, 90%%, 8GiB, bytes); default: the engine's own (0.9, max "
        "4 GiB on CPU). Tests use a small one because zeroing 4 GiB takes seconds.",
    )
    # One thread by default: on a shared 2-core box, 2 OpenMP threads stall on each other's barriers whenever a
    # neighbour holds a core (decode steps measured 3x slower at load ~4), and HF's continuous batching loop runs
    # in its own Python thread where this hits differently, so a 2-thread run mostly measures the neighbours.
    p.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads for every phase (use all cores on an idle box)"
    )
    p.add_argument("--skip-hf-static", action="store_true")
    p.add_argument("--skip-hf-continuous", action="store_true")
    p.add_argument(
        "--hf-continuous-limit",
        type=float,
        default=HF_CONTINUOUS_LIMIT_S,
        metavar="SECONDS",
        help="stop HF continuous batching after this long and rate the tokens it generated by then (0: no limit); "
        "its CPU attention slows quadratically with the concurrent requests, so the full workload takes ~25 min",
    )
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from transformers import AutoTokenizer

    from leanserve.model.embedded import resolve_model_path

    workload = Workload(
        num_requests=args.num_requests or (24 if args.quick else 128),
        prompt_range=tuple(args.prompt_len or ((32, 256) if args.quick else (32, 512))),
        output_range=tuple(args.output_len or ((16, 96) if args.quick else (16, 256))),
        seed=args.seed,
        data=args.data,
    )
    model_dir = Path(resolve_model_path(args.model))
    requests = build_requests(AutoTokenizer.from_pretrained(model_dir), workload)

    engine = run_engine(args.model, requests, args.threads, args.kv_cache_memory)
    torch.set_num_threads(args.threads)  # the engine set it already; repeated here so the HF phases state it
    results = [engine]
    static = continuous = None
    continuous_error = None
    if not args.skip_hf_static:
        static = run_hf_static(model_dir, requests)
        results.append(static)
    if not args.skip_hf_continuous:
        try:
            continuous = run_hf_continuous(
                model_dir,
                requests,
                engine.extra["max_num_seqs"],
                engine.extra["max_num_batched_tokens"],
                args.hf_continuous_limit or None,
            )
            results.append(continuous)
        except Exception as e:  # noqa: BLE001 - absent in this transformers, or fails here: say why, keep the rest
            continuous_error = f"{type(e).__name__}: {e}"
        if continuous_error:
            print(f"hf continuous batching: not measured ({continuous_error})", file=sys.stderr)

    print()
    print_table(results)
    e = engine.extra
    print(
        f"engine overhead: {e['overhead_share']:.1%} of step time outside the model forward "
        f"({e['model_forward_seconds']:.1f} s forward of {e['step_seconds']:.1f} s in {e['steps']} steps; "
        f"{e['overhead_share_outside_runner']:.1%} outside runner.execute)"
    )
    if continuous is not None and continuous.extra["stopped_at_limit_s"]:
        cut_at = continuous.extra["stopped_at_limit_s"]
        print(
            f"hf continuous batching was stopped at --hf-continuous-limit {cut_at:.0f} s "
            f"with {continuous.extra['finished_requests']}/{continuous.requests} requests finished; its rate counts "
            "every token generated by then, so its ratio compares the engine's whole run with HF's first part"
        )
    summary: dict[str, Any] = {
        "engine_tok_s": round(engine.tok_s, 2),
        "hf_static_tok_s": round(static.tok_s, 2) if static else None,
        "hf_continuous_tok_s": round(continuous.tok_s, 2) if continuous else None,
        "ratio_vs_hf_static": round(engine.tok_s / static.tok_s, 3) if static else None,
        "ratio_vs_hf_continuous": round(engine.tok_s / continuous.tok_s, 3)
        if continuous and continuous.tok_s
        else None,
        "engine_overhead_share": round(e["overhead_share"], 4),
        "engine_overhead_share_outside_runner": round(e["overhead_share_outside_runner"], 4),
        "engine_overhead_share_of_wall": round(e["overhead_share_of_wall"], 4),
        "hf_continuous_error": continuous_error,
        # Set when HF continuous batching hit --hf-continuous-limit: its rate then covers that many seconds only.
        "hf_continuous_cut_at_s": continuous.extra["stopped_at_limit_s"] if continuous else None,
        "workload": workload.describe(),
        "output_tokens": engine.output_tokens,
        "model": str(model_dir),
        "torch_threads": torch.get_num_threads(),
        "hf_static_batch": HF_STATIC_BATCH,
        "load_avg": {r.system: [r.load_before, r.load_after] for r in results},
        "load_avg_end": [round(x, 2) for x in os.getloadavg()],
        "engine": e,
        "hf_static": static.extra if static else None,
        "hf_continuous": continuous.extra if continuous else None,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
