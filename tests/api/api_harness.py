"""Helpers for tests/api: a tiny random Llama with a word-level tokenizer, and real uvicorn servers
over it on 127.0.0.1. A module of its own, as every tests/ folder has a conftest.py."""

from __future__ import annotations

import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx

from leanserve.api.server import create_app, server_for
from leanserve.engine.async_engine import AsyncEngine
from leanserve.engine.config import EngineConfig
from leanserve.settings import ServerSettings
from tests.conftest import build_tiny_checkpoint
from tests.server_thread import free_port, wait_for  # noqa: F401 - re-exported for the tests here

MAX_MODEL_LEN = 128


def build_tiny_model(folder: Path) -> Path:
    # Untied head, ChatML-ish word vocabulary (the chat tests tokenize roles and markers to known ids).
    return build_tiny_checkpoint(folder, "llama", chat_tokens=True, tie_word_embeddings=False)


def engine_config(model: Path, **overrides: Any) -> EngineConfig:
    kw: dict[str, Any] = dict(
        model=str(model), kv_cache_memory=1024 * 8192, block_size=16, max_num_seqs=64,
        max_num_batched_tokens=512, max_model_len=MAX_MODEL_LEN, num_threads=1,
        cpu_matmul_dtype="float32",  # the same outputs on every CPU (one test holds them to transformers')
    )
    kw.update(overrides)
    return EngineConfig(**kw)


class ServerThread:
    """uvicorn on 127.0.0.1 in a thread with its own event loop (the engine's loop, too)."""

    def __init__(self, settings: ServerSettings, engine: AsyncEngine | None) -> None:
        self.app = create_app(settings, engine)
        self.server = server_for(self.app, settings)
        self.url = f"http://127.0.0.1:{settings.port}"
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def state(self) -> Any:
        return self.app.state.server

    @property
    def engine(self) -> AsyncEngine:
        return self.state.engine

    def start(self, wait_ready: bool = True) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.01)
        if wait_ready:
            while httpx.get(f"{self.url}/health").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("engine did not become ready")
                time.sleep(0.05)
        return self

    def sigterm(self) -> None:
        """What SIGTERM does (uvicorn only installs signal handlers on the main thread)."""
        self.server.handle_exit(signal.SIGTERM, None)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
