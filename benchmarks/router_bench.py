"""Two real replicas behind the router: p95 latency per routing policy under skewed load.

Starts two `leanserve serve` replicas on loopback, then for each policy a router in front of them,
and sends the same bounded, skewed load: every other request is long (many output tokens), the
rest short. Round-robin alternates too, so it stacks every long request on one replica; a
load-aware policy should not. Prints a table and, last, one JSON line with the p95s.

Usage: python benchmarks/router_bench.py [--requests 120] [--concurrency 8] [--serve-args "..."]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leanserve_cmd() -> list[str]:
    """The `leanserve` CLI, or a clear exit when it (or its `serve` subcommand) is not there yet."""
    exe = shutil.which("leanserve")
    cmd = [exe] if exe else [sys.executable, "-m", "leanserve.cli"]
    probe = subprocess.run([*cmd, "serve", "--help"], capture_output=True, text=True, timeout=120)
    if probe.returncode != 0:
        sys.exit(f"router_bench: `leanserve serve` is not available ({' '.join(cmd)} serve --help exited "
                 f"{probe.returncode}: {(probe.stderr or probe.stdout).strip()[-300:]}). This benchmark needs "
                 "the real replica server.")
    return cmd


@contextmanager
def process(cmd: list[str], name: str, log_dir: str):
    log = open(os.path.join(log_dir, f"{name}.log"), "w")  # closed in the finally below
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


def wait_healthy(url: str, proc: subprocess.Popen, timeout_s: float, name: str, log_dir: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"router_bench: {name} exited with {proc.returncode}; see {log_dir}/{name}.log")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    sys.exit(f"router_bench: {name} not healthy after {timeout_s:.0f}s; see {log_dir}/{name}.log")


@dataclass
class Sample:
    ttft_s: float
    e2e_s: float
    ok: bool


async def one(client: httpx.AsyncClient, model: str, max_tokens: int, i: int, ignore_eos: bool) -> Sample:
    body = {"model": model, "prompt": f"Request {i}: write a story about a lighthouse keeper.",
            "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    if ignore_eos:  # vLLM's extension: generate exactly max_tokens so "long" really is long
        body["ignore_eos"] = True
    t0 = time.monotonic()
    ttft = None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as resp:
            if resp.status_code != 200:
                await resp.aread()
                return Sample(0.0, time.monotonic() - t0, False)
            async for line in resp.aiter_lines():
                if line.startswith("data:") and ttft is None:
                    ttft = time.monotonic() - t0
    except httpx.HTTPError:
        return Sample(0.0, time.monotonic() - t0, False)
    e2e = time.monotonic() - t0
    return Sample(ttft if ttft is not None else e2e, e2e, True)


async def load(url: str, model: str, n: int, concurrency: int, long_tokens: int, short_tokens: int,
               deadline_s: float, ignore_eos: bool = True) -> list[Sample]:
    sem = asyncio.Semaphore(concurrency)
    stop_at = time.monotonic() + deadline_s

    async def task(i: int, client: httpx.AsyncClient) -> Sample | None:
        async with sem:
            if time.monotonic() > stop_at:
                return None
            return await one(client, model, long_tokens if i % 2 == 0 else short_tokens, i, ignore_eos)

    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(600, connect=5)) as client:
        results = await asyncio.gather(*(task(i, client) for i in range(n)))
    return [r for r in results if r is not None]


def p95(values: list[float]) -> float:
    values = sorted(values)
    return values[max(0, math.ceil(0.95 * len(values)) - 1)] if values else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", default="round-robin,least-loaded")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--long-tokens", type=int, default=128)
    p.add_argument("--short-tokens", type=int, default=8)
    p.add_argument("--model", default="", help="model name sent in requests (the replica's default if empty)")
    p.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True,
                   help="send ignore_eos so every request generates max_tokens (if the server accepts it)")
    p.add_argument("--serve-args", default="", help="extra arguments for `leanserve serve`")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--max-seconds", type=float, default=600, help="time bound for each policy's load")
    p.add_argument("--log-dir", default="benchmarks/results/router_bench_logs")
    args = p.parse_args(argv)

    cmd = leanserve_cmd()
    os.makedirs(args.log_dir, exist_ok=True)
    ports = [free_port(), free_port()]
    replica_urls = [f"http://127.0.0.1:{port}" for port in ports]
    extra = shlex.split(args.serve_args)
    results: dict[str, dict] = {}
    with process([*cmd, "serve", "--host", "127.0.0.1", "--port", str(ports[0]), *extra], "replica0",
                 args.log_dir) as r0, \
            process([*cmd, "serve", "--host", "127.0.0.1", "--port", str(ports[1]), *extra], "replica1",
                    args.log_dir) as r1:
        for proc, url, name in ((r0, replica_urls[0], "replica0"), (r1, replica_urls[1], "replica1")):
            wait_healthy(url, proc, args.startup_timeout, name, args.log_dir)
        model = args.model or httpx.get(f"{replica_urls[0]}/v1/models", timeout=10).json()["data"][0]["id"]
        for policy in args.policies.split(","):
            port = free_port()
            router_cmd = [sys.executable, "-m", "leanserve.router", "--port", str(port), "--policy", policy,
                          *[a for u in replica_urls for a in ("--replica", u)]]
            with process(router_cmd, f"router-{policy}", args.log_dir) as router:
                url = f"http://127.0.0.1:{port}"
                wait_healthy(url, router, 60, f"router-{policy}", args.log_dir)
                t0 = time.monotonic()
                samples = asyncio.run(load(url, model, args.requests, args.concurrency, args.long_tokens,
                                           args.short_tokens, args.max_seconds, args.ignore_eos))
                wall = time.monotonic() - t0
            ok = [s for s in samples if s.ok]
            if not ok:
                sys.exit(f"router_bench: every request through the {policy} router failed; see {args.log_dir}")
            results[policy] = {"requests": len(samples), "errors": len(samples) - len(ok),
                               "ttft_p95_s": round(p95([s.ttft_s for s in ok]), 3),
                               "e2e_p95_s": round(p95([s.e2e_s for s in ok]), 3),
                               "req_s": round(len(ok) / wall, 2)}
            print(f"{policy:<16} " + "  ".join(f"{k}={v}" for k, v in results[policy].items()), flush=True)
    out: dict = {"policies": results}
    if "round-robin" in results and "least-loaded" in results:
        rr, ll = results["round-robin"], results["least-loaded"]
        out["e2e_p95_improvement"] = round(1 - ll["e2e_p95_s"] / rr["e2e_p95_s"], 3) if rr["e2e_p95_s"] else None
        out["ttft_p95_improvement"] = (round(1 - ll["ttft_p95_s"] / rr["ttft_p95_s"], 3)
                                       if rr["ttft_p95_s"] else None)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
