from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import pytest

from leanserve.router.app import create_app  # noqa: E402
from leanserve.router.proxy import RouterConfig  # noqa: E402

# The helpers sit beside the tests; make them importable whatever pytest's import mode.
from tests.router.router_fakes import FakeReplica, ServerThread  # noqa: E402


@pytest.fixture
def fleet() -> Iterator[Callable[..., tuple[list[FakeReplica], list[ServerThread]]]]:
    """Start fake replicas; all are stopped at teardown."""
    servers: list[ServerThread] = []

    def start(*replicas: FakeReplica) -> tuple[list[FakeReplica], list[ServerThread]]:
        started = [ServerThread(r.app()).start() for r in replicas]
        servers.extend(started)
        return list(replicas), started

    yield start
    for s in servers:
        with contextlib.suppress(Exception):
            s.stop()


@pytest.fixture
def router_server() -> Iterator[Callable[..., ServerThread]]:
    """Start a router (real uvicorn, real sockets) over the given config; stopped at teardown."""
    servers: list[ServerThread] = []

    def start(config: RouterConfig) -> ServerThread:
        server = ServerThread(create_app(config)).start()
        servers.append(server)
        return server

    yield start
    for s in servers:
        s.stop()
