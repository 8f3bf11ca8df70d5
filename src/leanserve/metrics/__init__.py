"""Prometheus metrics: engine events recorded on the engine thread, aggregated off the hot loop.

``setup_metrics(app, engine, settings)`` adds ``GET /metrics`` (a registry per app, so several apps
in one process never clash) and starts the progress reporter with the app. The engine may be passed
later: when ``engine`` is None it is taken from ``app.state.engine`` at startup.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from leanserve.metrics.collector import EngineCollector
from leanserve.metrics.gpu import GpuSampler
from leanserve.metrics.progress import ProgressReporter, log_startup

__all__ = ["MetricsHandle", "log_startup", "setup_metrics"]

logger = logging.getLogger(__name__)


@dataclass
class MetricsHandle:
    """What ``setup_metrics`` built; ``start``/``stop`` are idempotent."""

    settings: Any
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    gpu: GpuSampler = field(default_factory=GpuSampler)
    collector: EngineCollector | None = None
    reporter: ProgressReporter | None = None

    def attach(self, engine: Any) -> None:
        """Start recording ``engine`` (an ``AsyncEngine``); a second call is a no-op."""
        if self.collector is not None or engine is None:
            return
        self.collector = EngineCollector(engine, self.settings, self.gpu)
        self.collector.attach()
        self.registry.register(self.collector)
        interval = float(getattr(self.settings, "progress_interval_s", 5.0) or 0.0)
        if interval > 0:
            self.reporter = ProgressReporter(self.collector, interval)

    def start(self, engine: Any = None) -> None:
        self.attach(engine)
        if self.reporter is not None:
            self.reporter.start()

    def stop(self) -> None:
        if self.reporter is not None:
            self.reporter.stop()

    def render(self) -> bytes:
        return generate_latest(self.registry)


def setup_metrics(app: FastAPI, engine: Any, settings: Any) -> MetricsHandle:
    """Attach ``GET /metrics`` to ``app``, fed by ``engine`` (an ``AsyncEngine``, or None for later)."""
    handle = MetricsHandle(settings)
    handle.attach(engine)
    app.state.metrics = handle

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:  # sync: prometheus-client and NVML block, so run in the threadpool
        return Response(handle.render(), media_type=CONTENT_TYPE_LATEST)

    # Wrap whatever lifespan the app has (FastAPI's default or the server's own) so the reporter
    # runs exactly while the app does, after the server has made its engine.
    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(a: Any) -> AsyncIterator[Any]:
        async with inner(a) as state:
            handle.start(engine or getattr(a.state, "engine", None))
            try:
                yield state
            finally:
                handle.stop()

    app.router.lifespan_context = lifespan
    return handle
