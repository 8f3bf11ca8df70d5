"""Fixtures for tests/api: the tiny model, and real servers over it (all stopped at the end)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from leanserve.engine.async_engine import AsyncEngine  # noqa: E402
from leanserve.engine.llm_engine import LLMEngine  # noqa: E402
from leanserve.settings import ServerSettings  # noqa: E402

# The helpers sit beside the tests; make them importable whatever pytest's import mode.
from tests.api.api_harness import ServerThread, build_tiny_model, engine_config, free_port  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def start_server(tiny_model: Path) -> Iterator[Callable[..., ServerThread]]:
    """Start a server over a fresh tiny engine (``inject=False``: the server loads it from settings)."""
    servers: list[ServerThread] = []

    def start(inject: bool = True, wait_ready: bool = True, engine_overrides: dict[str, Any] | None = None,
              **settings: Any) -> ServerThread:
        settings.setdefault("port", free_port())
        settings.setdefault("log_level", "warning")
        settings.setdefault("served_model_name", "tiny")
        config = engine_config(tiny_model, **(engine_overrides or {}))
        s = ServerSettings(model=str(tiny_model), **settings)
        engine = AsyncEngine(LLMEngine(config)) if inject else None
        server = ServerThread(s, engine).start(wait_ready=wait_ready)
        servers.append(server)
        return server

    yield start
    for s in servers:
        with contextlib.suppress(Exception):
            s.stop()


@pytest.fixture(scope="session")
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    """The shared server most tests talk to."""
    return start_server()


@pytest.fixture
def client(server: ServerThread) -> Any:
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=30)
