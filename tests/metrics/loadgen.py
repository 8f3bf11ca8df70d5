"""A bounded load generator for the metrics tests; also runs as a script (JSON spec on stdin).

Kept free of leanserve imports so the child process starts in a fraction of a second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field

import httpx

MODEL_NAME = "tiny-llama"  # the served model name the test servers use


@dataclass
class RequestResult:
    prompt_tokens: int
    output_tokens: int
    finish_reason: str | None
    ttft: float
    e2e: float


@dataclass
class LoadResult:
    results: list[RequestResult] = field(default_factory=list)

    @property
    def prompt_tokens(self) -> int:
        return sum(r.prompt_tokens for r in self.results)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.results)


def make_requests(n: int, seed: int = 0, max_tokens: tuple[int, int] = (4, 40)) -> list[tuple[list[int], int]]:
    """``n`` (prompt, max_tokens) pairs with varied lengths; a shared prefix exercises the prefix cache."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 300) for _ in range(32)]
    out = []
    for i in range(n):
        tail = [rng.randrange(3, 300) for _ in range(rng.randrange(1, 48))]
        prompt = shared + tail if i % 3 == 0 else tail
        out.append((prompt, rng.randrange(*max_tokens)))
    return out


async def one_request(client: httpx.AsyncClient, url: str, prompt: list[int], max_tokens: int,
                      api: str = "generate") -> RequestResult:
    """One streamed request; ``api`` is "openai" (/v1/completions, SSE) or "generate" (test NDJSON)."""
    start = time.perf_counter()
    ttft = math.nan
    tokens, reason = 0, None
    if api == "openai":
        body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        path = "/v1/completions"
    else:
        body = {"prompt_token_ids": prompt, "max_tokens": max_tokens}
        path = "/generate"
    async with client.stream("POST", f"{url}{path}", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if api == "openai":
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                item = json.loads(line[len("data: "):])
                if item.get("choices") and math.isnan(ttft):
                    ttft = time.perf_counter() - start
                for choice in item.get("choices") or []:
                    reason = choice.get("finish_reason") or reason
                if item.get("usage"):  # the last chunk: the server's exact token counts
                    tokens = item["usage"]["completion_tokens"]
                    assert item["usage"]["prompt_tokens"] == len(prompt)
                continue
            if not line:
                continue
            item = json.loads(line)
            if item["token_ids"] and math.isnan(ttft):
                ttft = time.perf_counter() - start
            tokens += len(item["token_ids"])
            if item["finished"]:
                reason = item["finish_reason"]
    return RequestResult(len(prompt), tokens, reason, ttft, time.perf_counter() - start)


async def run_load(url: str, requests: list[tuple[list[int], int]], concurrency: int,
                   api: str = "generate") -> LoadResult:
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def bounded(prompt: list[int], max_tokens: int) -> RequestResult:
            async with sem:
                return await one_request(client, url, prompt, max_tokens, api)

        results = await asyncio.gather(*(bounded(p, m) for p, m in requests))
    return LoadResult(list(results))


def main() -> None:
    spec = json.load(sys.stdin)
    requests = [tuple(r) for r in spec["requests"]]
    load = asyncio.run(run_load(spec["url"], requests, spec["concurrency"], spec.get("api", "generate")))
    print(json.dumps([dataclasses.asdict(r) for r in load.results]))


if __name__ == "__main__":
    main()
