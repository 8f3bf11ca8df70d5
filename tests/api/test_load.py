"""Bounded load: 200 concurrent streams, a third of them walk away; nothing leaks, /health stays fast."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from tests.api.api_harness import ServerThread, wait_for

CLIENT = str(Path(__file__).with_name("load_client.py"))


def test_200_concurrent_streams_with_disconnects(start_server: Callable[..., ServerThread]) -> None:
    server = start_server()
    prober = subprocess.Popen([sys.executable, CLIENT, "probe", server.url], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert prober.stdout.readline().strip() == "ready"
        load = subprocess.run([sys.executable, CLIENT, "load", server.url], capture_output=True, text=True,
                              timeout=120)
        assert load.returncode == 0, load.stderr
    finally:
        latencies = json.loads(prober.communicate(input="", timeout=30)[0])
    results = json.loads(load.stdout)
    assert results.count("left") == 67  # every third request, half before any token
    assert results.count("done") == 133, sorted(set(results))
    engine = server.engine
    wait_for(lambda: engine.num_unfinished == 0 and engine.engine.block_manager.num_used_blocks == 0, timeout=5)
    assert not engine.engine.seqs and server.state.admitted_seqs == 0
    assert len(latencies) > 10
    assert max(latencies) < 0.1, f"/health took up to {max(latencies) * 1000:.0f} ms under load"
