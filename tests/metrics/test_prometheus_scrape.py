"""A real Prometheus (Debian's package) scrapes a live leanserve with our config and rules."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.metrics.loadgen import make_requests, run_load
from tests.metrics.metrics_harness import require_tool

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "deploy/prometheus/prometheus.yml"
RULES = ROOT / "deploy/prometheus/alerts.yml"
INSTALL = "apt-get install -y --no-install-recommends prometheus"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_test_config(dest: Path, leanserve_port: int) -> Path:
    """Our prometheus.yml with the leanserve job pointed at the test server, scraping every second."""
    config = yaml.safe_load(CONFIG.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    jobs = [job for job in config["scrape_configs"] if job["job_name"] == "leanserve"]
    assert jobs, "deploy/prometheus/prometheus.yml has no 'leanserve' job"
    jobs[0]["static_configs"] = [{"targets": [f"127.0.0.1:{leanserve_port}"]}]
    config["scrape_configs"] = jobs
    shutil.copy(RULES, dest / RULES.name)  # rule_files are relative to the config file
    path = dest / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@contextlib.contextmanager
def prometheus(binary: str, config: Path, workdir: Path) -> Iterator[str]:
    port = _free_port()
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"prometheus exited: {(workdir / 'prometheus.log').read_text()[-2000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{url}/-/ready", timeout=1).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not become ready in 30 s")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(url: str, promql: str) -> list[dict[str, Any]]:
    resp = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=5)
    resp.raise_for_status()
    body = resp.json()
    assert body["status"] == "success", body
    return body["data"]["result"]


def scalar(url: str, promql: str) -> float | None:
    result = query(url, promql)
    return float(result[0]["value"][1]) if result else None


def wait_for(url: str, promql: str, ok: Any, timeout: float = 20.0) -> float:
    """Poll until the query returns a value that ``ok`` accepts; return it."""
    deadline = time.monotonic() + timeout
    value = None
    while time.monotonic() < deadline:
        value = scalar(url, promql)
        if value is not None and ok(value):
            return value
        time.sleep(0.25)
    raise AssertionError(f"{promql} never satisfied the check (last value {value})")


def test_prometheus_scrapes_leanserve(live_server, tmp_path: Path) -> None:
    binary = require_tool(shutil.which("prometheus"), "prometheus", INSTALL)
    port = int(live_server.url.rsplit(":", 1)[1])
    config = write_test_config(tmp_path, port)
    with prometheus(binary, config, tmp_path) as prom:
        wait_for(prom, 'up{job="leanserve"}', lambda v: v == 1)
        baseline = wait_for(prom, "sum(vllm:request_success_total)", lambda v: v >= 0)

        # Keep a bounded load running until Prometheus has seen requests in flight (or 60 requests).
        stop = threading.Event()
        sent = [0]

        def drive() -> None:
            async def loop() -> None:
                while not stop.is_set() and sent[0] < 60:
                    batch = make_requests(6, seed=100 + sent[0], max_tokens=(60, 120))
                    await run_load(live_server.url, batch, concurrency=6, api=live_server.api)
                    sent[0] += len(batch)

            asyncio.run(loop())

        driver = threading.Thread(target=drive, daemon=True)
        driver.start()
        try:
            wait_for(prom, 'max_over_time(vllm:num_requests_running{job="leanserve"}[1m])', lambda v: v >= 1)
        finally:
            stop.set()
            driver.join(timeout=60)
        assert not driver.is_alive()
        total = baseline + sent[0]

        # Counters arrive exactly; gauges and histograms are sane.
        wait_for(prom, "sum(vllm:request_success_total)", lambda v: v == total)
        assert scalar(prom, "sum(vllm:time_to_first_token_seconds_count)") == total
        assert scalar(prom, "sum(vllm:request_queue_time_seconds_count)") == total
        p50 = scalar(prom, "histogram_quantile(0.5, sum by (le) (vllm:time_to_first_token_seconds_bucket))")
        assert p50 is not None and 0 < p50 < 10
        waiting = scalar(prom, 'max_over_time(vllm:num_requests_waiting{job="leanserve"}[1m])')
        assert waiting is not None and 0 <= waiting <= 60
        kv = scalar(prom, 'max_over_time(vllm:kv_cache_usage_perc{job="leanserve"}[1m])')
        assert kv is not None and 0 < kv <= 1  # blocks were in use during the load
        blocks = scalar(prom, "leanserve_kv_blocks")
        assert blocks == live_server.async_engine.engine.block_manager.num_blocks
        assert scalar(prom, "sum(rate(vllm:generation_tokens_total[1m]))") > 0

        # Our alert rules loaded and evaluate cleanly against real series.
        rules = httpx.get(f"{prom}/api/v1/rules", timeout=5).json()["data"]["groups"]
        loaded = {r["name"]: r for g in rules for r in g["rules"]}
        assert {"LeanserveTTFTHigh", "LeanserveQueueGrowing", "LeanserveKVCacheNearFull",
                "LeanservePreemptionStorm"} <= set(loaded)
        assert all(r["health"] in ("ok", "unknown") for r in loaded.values()), loaded
