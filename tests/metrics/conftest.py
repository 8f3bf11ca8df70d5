from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from leanserve.metrics.gpu import GpuSampler  # noqa: E402

# The helpers sit beside the tests; make them importable whatever pytest's import mode.
from tests.metrics.loadgen import MODEL_NAME  # noqa: E402
from tests.metrics.metrics_harness import FakeNvml, ServerThread, build_tiny_model, make_app, settings_for_test  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@dataclass
class LiveServer:
    url: str
    async_engine: Any
    app: Any
    api: str  # "openai": the real server (create_app); "generate": the minimal test app
    fake_gpu: bool  # True when the GPU families come from FakeNvml (no real NVML here)


def _server_app(async_engine: Any) -> tuple[Any, str]:
    """The real API server when it is there, else a minimal app with the same metrics path."""
    try:
        from leanserve.api.server import create_app
        from leanserve.settings import ServerSettings
    except ImportError:
        return make_app(async_engine, settings_for_test()), "generate"
    settings = ServerSettings(served_model_name=MODEL_NAME, cost={"usd_per_gpu_hour": 3.6, "num_gpus": 1})
    return create_app(settings, engine=async_engine), "openai"


@pytest.fixture(scope="session")
def live_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    """leanserve over the tiny model, shared by the tests in this folder.

    Counts only ever grow, so tests compare scrapes taken before and after their own load.
    """
    from leanserve.engine.async_engine import AsyncEngine
    from leanserve.engine.config import EngineConfig
    from leanserve.engine.llm_engine import LLMEngine

    # max_num_seqs below the load's concurrency so requests queue and the queue-time histogram and
    # waiting gauge see real values; one torch thread leaves the other core to HTTP.
    config = EngineConfig(model=str(tiny_model_dir), kv_cache_memory=2 << 20, max_num_seqs=4,
                          num_threads=1, max_num_batched_tokens=256)
    async_engine = AsyncEngine(LLMEngine(config))
    app, api = _server_app(async_engine)
    fake = not GpuSampler().available
    if fake:  # exercise the GPU families on a machine without NVML
        handle = app.state.metrics
        handle.gpu = handle.collector.gpu = GpuSampler(FakeNvml(2))
    server = ServerThread(app).start()
    try:
        yield LiveServer(server.url, async_engine, app, api, fake_gpu=fake)
    finally:
        server.stop()
