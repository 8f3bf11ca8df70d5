"""What the operator reads in the log: one startup summary, then a line every few seconds while busy."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("leanserve.progress")

GIB = float(1 << 30)


@dataclass
class StartupSummary:
    device: str
    dtype: str
    weight_bytes: int
    kv_blocks: int
    block_size: int
    kv_tokens: int
    kv_bytes: int
    max_model_len: int
    max_concurrency_at_full_context: float
    config: dict[str, Any]


def _device_name(device: Any) -> str:
    if getattr(device, "type", "cpu") == "cuda":
        try:
            import torch

            return f"{device} ({torch.cuda.get_device_name(device)})"
        except Exception:  # the name is decoration; never fail startup over it
            return str(device)
    return str(device)


def startup_summary(engine: Any) -> StartupSummary:
    """Facts about a loaded engine (an ``LLMEngine`` or an ``AsyncEngine`` wrapping one)."""
    engine = getattr(engine, "engine", engine)
    bm = engine.block_manager
    kv_tokens = bm.num_blocks * bm.block_size
    itemsize = getattr(engine.dtype, "itemsize", 4)
    kv_bytes = engine.model_config.kv_bytes_per_token(itemsize) * kv_tokens
    config = engine.config
    return StartupSummary(
        device=_device_name(engine.device),
        dtype=str(engine.dtype).removeprefix("torch."),
        weight_bytes=int(engine.weight_bytes),
        kv_blocks=bm.num_blocks,
        block_size=bm.block_size,
        kv_tokens=kv_tokens,
        kv_bytes=int(kv_bytes),
        max_model_len=engine.max_model_len,
        max_concurrency_at_full_context=kv_tokens / engine.max_model_len,
        config=dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(vars(config)),
    )


def log_startup(engine: Any, settings: Any = None, log: logging.Logger = logger) -> StartupSummary:
    """Log the device, weight memory, KV capacity and config; the server calls this once at start."""
    s = startup_summary(engine)
    model = getattr(getattr(engine, "engine", engine), "model_dir", "?")
    served = getattr(settings, "served_model_name", None)
    log.info("model: %s%s", model, f" (served as {served!r})" if served else "")
    log.info("device: %s, dtype %s, weights %.2f GiB", s.device, s.dtype, s.weight_bytes / GIB)
    log.info(
        "KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB); max concurrency %.1f at full context "
        "(%d tokens)",
        s.kv_blocks, s.block_size, s.kv_tokens, s.kv_bytes / GIB, s.max_concurrency_at_full_context,
        s.max_model_len,
    )
    log.info("engine config: %s", " ".join(f"{k}={v}" for k, v in s.config.items()))
    return s


@dataclass
class ProgressSnapshot:
    at: float
    prompt_tokens: int
    generation_tokens: int


class ProgressReporter:
    """Every ``interval`` seconds while the engine has work, log queue, KV and token rates.

    A daemon thread, so it works whatever lifespan the app uses; it also drains the metrics
    recorder so pending step records stay few even when nothing scrapes ``/metrics``.
    """

    def __init__(self, collector: Any, interval: float = 5.0, log: logging.Logger = logger,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.collector = collector
        self.interval = interval
        self.log = log
        self.clock = clock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last: ProgressSnapshot | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="leanserve-progress", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tick()
            except Exception:  # a reporting bug must not take the server down
                logger.exception("progress reporter failed")

    def tick(self) -> str | None:
        """Drain, and log one line if anything is running, queued or was processed since last time."""
        stats = self.collector.stats
        stats.drain()
        now = self.clock()
        with stats.lock:
            snap = ProgressSnapshot(now, stats.prompt_tokens, stats.generation_tokens)
        last, self._last = self._last, snap
        engine = self.collector.async_engine.engine
        running, waiting = engine.num_running, engine.num_waiting
        if last is None:
            last = ProgressSnapshot(self.collector.started_at, 0, 0)
        elapsed = max(now - last.at, 1e-9)
        prompt_rate = (snap.prompt_tokens - last.prompt_tokens) / elapsed
        gen_rate = (snap.generation_tokens - last.generation_tokens) / elapsed
        if not (running or waiting or prompt_rate or gen_rate):
            return None  # idle: stay quiet
        line = (
            f"running: {running} reqs, waiting: {waiting} reqs, "
            f"KV cache: {engine.block_manager.usage * 100:.1f}%, "
            f"prompt: {prompt_rate:.1f} tok/s, generation: {gen_rate:.1f} tok/s"
        )
        self.log.info("%s", line)
        return line
