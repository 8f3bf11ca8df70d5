"""Disconnects abort and free KV blocks at once; SIGTERM drains, then exits; no request ends in silence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.api_harness import ServerThread, free_port, wait_for


def slow_engine(server: ServerThread, seconds: float) -> None:
    server.engine.step_listeners.append(lambda *_: time.sleep(seconds))


def kv_idle(server: ServerThread) -> bool:
    e = server.engine
    return e.num_unfinished == 0 and e.engine.block_manager.num_used_blocks == 0 and not e.engine.seqs


@pytest.fixture
def slow_server(start_server: Callable[..., ServerThread]) -> ServerThread:
    s = start_server(drain_timeout_s=0.5)
    slow_engine(s, 0.03)  # ~30 ms a token: a 100-token request lasts ~3 s
    return s


LONG = {"prompt": "t10 t11 t12", "max_tokens": 100, "ignore_eos": True}


def test_disconnect_mid_stream_frees_blocks(slow_server: ServerThread) -> None:
    with httpx.stream("POST", slow_server.url + "/v1/completions", json={**LONG, "stream": True}) as r:
        lines = r.iter_lines()
        got = [line for _, line in zip(range(6), lines, strict=False) if line.startswith("data:")]
        assert len(got) == 3
        assert slow_server.engine.engine.block_manager.num_used_blocks > 0
    start = time.monotonic()
    wait_for(lambda: kv_idle(slow_server), timeout=2)
    assert time.monotonic() - start < 0.5  # at once, not after the 100 tokens


def test_disconnect_before_first_token(slow_server: ServerThread) -> None:
    """A client gone while its request still waits in the queue never costs a token."""
    gate = threading.Event()
    slow_server.engine.step_listeners.append(lambda *_: gate.wait(10))  # hold the engine thread
    blocker = threading.Thread(target=lambda: httpx.post(slow_server.url + "/v1/completions",
                                                         json={**LONG, "max_tokens": 5}, timeout=30))
    blocker.start()
    wait_for(lambda: slow_server.engine.num_unfinished == 1)
    for body in ({**LONG, "stream": True}, LONG):  # streaming and not
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(slow_server.url + "/v1/completions", json=body, timeout=0.5)
        # The client has gone; the request left the engine's books without waiting for a token.
        wait_for(lambda: slow_server.engine.num_unfinished == 1, timeout=2)
    gate.set()
    blocker.join()
    wait_for(lambda: kv_idle(slow_server), timeout=5)


def test_non_streaming_disconnect_aborts(slow_server: ServerThread) -> None:
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(slow_server.url + "/v1/chat/completions", timeout=0.5, json={
            "messages": [{"role": "user", "content": "t10"}], "max_tokens": 100, "n": 2, "ignore_eos": True})
    start = time.monotonic()
    wait_for(lambda: kv_idle(slow_server), timeout=2)
    assert time.monotonic() - start < 0.5


def test_drain_timeout_ends_in_flight_requests_with_an_error(slow_server: ServerThread) -> None:
    results: dict[str, Any] = {}

    def non_streaming() -> None:
        results["plain"] = httpx.post(slow_server.url + "/v1/completions", json=LONG, timeout=30)

    t = threading.Thread(target=non_streaming)
    t.start()
    events = []
    with httpx.stream("POST", slow_server.url + "/v1/chat/completions", timeout=30, json={
            "messages": [{"role": "user", "content": "t10"}], "max_tokens": 100, "ignore_eos": True,
            "stream": True}) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            events.append(line[6:])
            if len(events) == 3:
                slow_server.sigterm()
    t.join()
    # The drain gave them 0.5 s, then ended them: an error event, then [DONE]; a 503 for the other.
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == "shutting_down"
    assert len(events) < 50
    plain = results["plain"]
    assert plain.status_code == 503 and plain.json()["error"]["code"] == "shutting_down"
    slow_server.thread.join(timeout=15)
    assert not slow_server.thread.is_alive()
    assert slow_server.engine.engine.block_manager.num_used_blocks == 0


def test_sigterm_lets_in_flight_requests_finish(tiny_model: Path, tmp_path: Path) -> None:
    """The real thing: `leanserve serve` in a subprocess, a real SIGTERM, a clean exit."""
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(f"port: {port}\nlog_level: warning\nserved_model_name: tiny\n"
                      "engine:\n  max_model_len: 512\n  kv_cache_memory: 16777216\n  num_threads: 1\n")
    env = {**os.environ, "LEANSERVE_DRAIN_TIMEOUT_S": "60"}
    proc = subprocess.Popen([sys.executable, "-m", "leanserve.cli", "serve", "--model", str(tiny_model),
                             "--config", str(config)], env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.1)
        body = {"prompt": "t10", "max_tokens": 500, "n": 4, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}}
        finish = {}
        usage = None
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=60) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: {"):
                    break
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            with pytest.raises(httpx.TransportError):  # no longer admitting: the socket is closed
                httpx.get(url + "/health", timeout=2)
            for line in lines:
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    usage = chunk["usage"] or usage
                    for c in chunk["choices"]:
                        if c["finish_reason"]:
                            finish[c["index"]] = c["finish_reason"]
        assert finish == {i: "length" for i in range(4)}
        assert usage["completion_tokens"] == 2000  # every token, though SIGTERM came after the first
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
