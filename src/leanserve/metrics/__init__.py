"""Prometheus metrics: engine events recorded on the engine thread, aggregated off the hot loop."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest


def setup_metrics(app: FastAPI, engine: Any, settings: Any) -> None:
    """Attach ``GET /metrics`` to ``app``, fed by ``engine`` (an ``AsyncEngine``)."""

    @app.get("/metrics", include_in_schema=False)
    def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
