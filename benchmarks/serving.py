"""Serving benchmark: load a running leanserve (or any OpenAI-compatible server) over HTTP.

Closed loop (``--concurrency N``: N clients, each sending its next request when the last finished) or
open loop (``--rate R``: Poisson arrivals at R req/s, seeded). Prompts are token-id lists cut from a
local text with exact input lengths (``--input-len``), outputs have exact lengths (``ignore_eos``), and
``--shared-prefix-len`` makes every prompt start with the same tokens (the prefix-cache workload).
Every request streams; TTFT is the time to the first token, ITL the gaps between tokens, TPOT the
mean gap per request.

It can start the server itself (``--start-server``, with ``--model``/``--config``/``--set KEY=VALUE``
applied as ``LEANSERVE_*`` environment variables), run, and stop it. The last line printed is one
JSON object with the results.

    python benchmarks/serving.py --start-server --concurrency 16 --num-requests 64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
DEFAULT_TEXT = REPO.parent / "shared" / "data" / "pride_and_prejudice.txt"


@dataclass
class RequestResult:
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    output_tokens: int = 0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``leanserve serve`` in a subprocess, configured through LEANSERVE_* environment variables."""

    def __init__(self, model: str | None, config: str | None, settings: dict[str, str], port: int) -> None:
        self.port = port
        env = dict(os.environ)
        env.update({f"LEANSERVE_{k.upper().replace('.', '__')}": v for k, v in settings.items()})
        cmd = [sys.executable, "-m", "leanserve.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if model:
            cmd += ["--model", model]
        if config:
            cmd += ["--config", config]
        self.log = open(f"/tmp/leanserve-bench-{port}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"server not healthy after {timeout:.0f}s; see {self.log.name}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


async def model_name(client: httpx.AsyncClient, url: str) -> str:
    response = await client.get(f"{url}/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def corpus_tokens(client: httpx.AsyncClient, url: str, text_path: Path, needed: int) -> list[int]:
    """Token ids of the local text, through the server's own tokenizer."""
    text = text_path.read_text(encoding="utf-8", errors="ignore") if text_path.exists() else ""
    if not text:
        raise FileNotFoundError(f"prompt text not found: {text_path}")
    # Enough characters for the tokens needed (~4 chars per token), tokenized in one call.
    response = await client.post(f"{url}/tokenize", json={"prompt": text[: max(needed * 6, 20_000)]})
    response.raise_for_status()
    return response.json()["tokens"]


def build_prompts(
    corpus: list[int], n: int, input_len: int, shared_prefix_len: int, rng: random.Random
) -> list[list[int]]:
    prefix = corpus[:shared_prefix_len]
    rest = input_len - shared_prefix_len
    prompts = []
    for _ in range(n):
        start = rng.randrange(shared_prefix_len, len(corpus) - rest)
        prompts.append(prefix + corpus[start : start + rest])
    return prompts


async def one_request(
    client: httpx.AsyncClient, url: str, model: str, prompt: list[int], output_len: int
) -> RequestResult:
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = start
    result = RequestResult(ok=False)
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if event.get("usage"):
                    result.output_tokens = event["usage"]["completion_tokens"]
                if event.get("choices") and event["choices"][0].get("text"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.e2e = time.perf_counter() - start
        result.ok = result.output_tokens > 0
    except httpx.HTTPError as exc:
        result.error = repr(exc)
    return result


async def run_load(args: argparse.Namespace, url: str) -> dict:
    rng = random.Random(args.seed)
    limits = httpx.Limits(max_connections=max(args.concurrency or 0, 256))
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        model = args.served_model_name or await model_name(client, url)
        corpus = await corpus_tokens(client, url, Path(args.text), args.input_len * 4)
        prompts = build_prompts(corpus, args.num_requests, args.input_len, args.shared_prefix_len, rng)
        # Warm-up outside the measurement: first-call initialisation is not what we measure.
        for prompt in prompts[: args.warmup]:
            await one_request(client, url, model, prompt, 4)
        results: list[RequestResult] = []
        start = time.perf_counter()
        if args.rate:
            gaps = [rng.expovariate(args.rate) for _ in prompts]
            tasks = []
            for prompt, gap in zip(prompts, gaps):
                await asyncio.sleep(gap)
                tasks.append(asyncio.create_task(one_request(client, url, model, prompt, args.output_len)))
            results = list(await asyncio.gather(*tasks))
        else:
            queue = list(prompts)

            async def worker() -> None:
                while queue:
                    prompt = queue.pop(0)
                    results.append(await one_request(client, url, model, prompt, args.output_len))

            await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        wall = time.perf_counter() - start
    return summarize(args, results, wall)


def summarize(args: argparse.Namespace, results: list[RequestResult], wall: float) -> dict:
    ok = [r for r in results if r.ok]
    ms = lambda values, q: None if not values else round(percentile(values, q) * 1000, 2)  # noqa: E731
    ttft = [r.ttft for r in ok]
    e2e = [r.e2e for r in ok]
    tpot = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itl = [gap for r in ok for gap in r.itl]
    output_tokens = sum(r.output_tokens for r in ok)
    summary = {
        "mode": f"rate={args.rate}" if args.rate else f"concurrency={args.concurrency}",
        "concurrency": args.concurrency if not args.rate else None,
        "rate": args.rate,
        "num_requests": len(results),
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "input_len": args.input_len,
        "output_len": args.output_len,
        "shared_prefix_len": args.shared_prefix_len,
        "wall_s": round(wall, 3),
        "req_s": round(len(ok) / wall, 4),
        "output_tok_s": round(output_tokens / wall, 2),
        "cost_per_1k_requests_usd": round(args.usd_per_hour * wall / 3600 / max(len(ok), 1) * 1000, 6),
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    for name, values in (("ttft", ttft), ("tpot", tpot), ("itl", itl), ("e2e", e2e)):
        for q in (50, 95, 99):
            summary[f"{name}_p{q}_ms"] = ms(values, q)
    if len(ok) < len(results):
        summary["first_error"] = next(r.error for r in results if not r.ok)
    return summary


def print_table(summary: dict) -> None:
    print(
        f"{summary['mode']}: {summary['completed']}/{summary['num_requests']} ok in {summary['wall_s']} s | "
        f"{summary['req_s']} req/s, {summary['output_tok_s']} output tok/s | "
        f"TTFT p50/p95/p99 {summary['ttft_p50_ms']}/{summary['ttft_p95_ms']}/{summary['ttft_p99_ms']} ms | "
        f"TPOT p50/p95 {summary['tpot_p50_ms']}/{summary['tpot_p95_ms']} ms | "
        f"e2e p50/p95 {summary['e2e_p50_ms']}/{summary['e2e_p95_ms']} ms | "
        f"${summary['cost_per_1k_requests_usd']}/1K req | load {summary['load_avg_1m']}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default=None, help="a running server (default: start one with --start-server)")
    p.add_argument("--start-server", action="store_true")
    p.add_argument("--model", default=None, help="for --start-server (default: the embedded model)")
    p.add_argument("--config", default=None, help="YAML config for --start-server")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="server setting for --start-server, e.g. engine.max_num_seqs=16")
    p.add_argument("--served-model-name", default=None)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--concurrency", type=int, default=16)
    mode.add_argument("--rate", type=float, default=None, help="open-loop Poisson arrivals per second")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--input-len", type=int, default=100)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--shared-prefix-len", type=int, default=0)
    p.add_argument("--text", default=str(DEFAULT_TEXT))
    p.add_argument("--usd-per-hour", type=float, default=2.0, help="price of the serving hardware per hour")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.rate:
        args.concurrency = None
    if args.shared_prefix_len >= args.input_len:
        p.error("--shared-prefix-len must be shorter than --input-len")
    return args


def run(args: argparse.Namespace) -> dict:
    server = None
    url = args.url
    if url is None:
        if not args.start_server:
            raise SystemExit("give --url of a running server, or --start-server")
        settings = dict(item.split("=", 1) for item in args.set)
        server = ServerProcess(args.model, args.config, settings, free_port())
        server.wait_ready()
        url = server.url
    try:
        return asyncio.run(run_load(args, url))
    finally:
        if server is not None:
            server.stop()


def main(argv: list[str] | None = None) -> None:
    summary = run(parse_args(argv))
    print_table(summary)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
