from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

# The helpers sit beside the tests; make them importable whatever pytest's import mode.
sys.path.insert(0, str(Path(__file__).parent))

from metrics_harness import FakeNvml, ServerThread, build_tiny_model, make_app, settings_for_test  # noqa: E402

from leanserve.metrics.gpu import GpuSampler  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@dataclass
class LiveServer:
    url: str
    async_engine: Any
    app: Any
    fake_gpu: bool  # True when the GPU families come from FakeNvml (no real NVML here)


@pytest.fixture(scope="session")
def live_server(tiny_model_dir: Path) -> Iterator[LiveServer]:
    """leanserve (the metrics path for real) over the tiny model, shared by the tests in this folder.

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
    real = GpuSampler()
    gpu = None if real.available else GpuSampler(FakeNvml(2))
    app = make_app(async_engine, settings_for_test(), gpu=gpu)
    server = ServerThread(app).start()
    try:
        yield LiveServer(server.url, async_engine, app, fake_gpu=gpu is not None)
    finally:
        server.stop()
