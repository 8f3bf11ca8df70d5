"""Load and probe clients for test_load.py, run as their own processes.

In their own processes so that what they measure is the server: in the server's process, a client
would compete with it for the GIL and its own parsing would show up as server latency.

    python load_client.py load URL   -> prints the 200 outcomes as JSON
    python load_client.py probe URL  -> GETs /health every 20 ms until stdin closes, prints latencies
"""

from __future__ import annotations

import asyncio
import json
import random
import sys
import threading
import time

import httpx

NUM_REQUESTS = 200
MAX_TOKENS = 16


async def one(host: str, port: int, i: int, rng: random.Random) -> str:
    """One streaming request over a bare socket: a load generator should cost the host little CPU
    (httpx spent ~2 ms a request here, which on 2 cores shows up as server latency)."""
    prompt = [rng.randrange(8, 300) for _ in range(rng.randrange(1, 24))]
    body = json.dumps({"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0.7, "seed": i,
                       "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}).encode()
    leave_after = None if i % 3 else (0 if i % 2 else 2)  # a third leave: before any token, or after 2
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (host.encode(), len(body), body))
        status = (await reader.readline()).split(b" ")[1]
        if status != b"200":
            return f"status {status.decode()}"
        while (await reader.readline()).strip():  # headers
            pass
        if leave_after == 0:
            return "left"
        events = []
        async for raw in reader:  # chunked framing: size lines, blank lines, and the events themselves
            line = raw.strip()
            if line.startswith(b"data: "):
                events.append(line[6:].decode())
                if leave_after is not None and len(events) == leave_after:
                    return "left"
    finally:
        writer.close()
    if not events or events[-1] != "[DONE]":
        return "no [DONE]"
    usage = json.loads(events[-2])["usage"]
    finishes = [c["finish_reason"] for e in events[:-2] for c in json.loads(e)["choices"]]
    if usage["completion_tokens"] != MAX_TOKENS or finishes[-1] != "length":
        return f"incomplete: {usage} {finishes[-1]}"
    return "done"


async def load(url: str) -> list[str]:
    host, port = url.removeprefix("http://").split(":")
    rng = random.Random(0)
    return await asyncio.gather(*[one(host, int(port), i, rng) for i in range(NUM_REQUESTS)])


def probe(url: str) -> list[float]:
    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    latencies = []
    with httpx.Client(base_url=url, timeout=5) as c:
        print("ready", flush=True)
        while not stop.is_set():
            start = time.perf_counter()
            status = c.get("/health").status_code
            latencies.append(time.perf_counter() - start if status == 200 else float("inf"))
            time.sleep(0.02)
    return latencies


if __name__ == "__main__":
    mode, url = sys.argv[1], sys.argv[2]
    print(json.dumps(asyncio.run(load(url)) if mode == "load" else probe(url)))
