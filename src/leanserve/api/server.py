"""The FastAPI app and its life: load the engine, serve, drain on SIGTERM, stop.

The engine loads on a worker thread after the server is listening, so ``/health`` answers 503
"loading" meanwhile instead of refusing connections. On SIGTERM the server stops admitting (503, and
uvicorn closes its listening socket), lets in-flight requests finish for ``drain_timeout_s``, aborts
what is left (those clients get an error, not silence), and exits.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Iterator
from types import FrameType

import uvicorn
from fastapi import FastAPI

from leanserve import __version__
from leanserve.api import chat, completions, info
from leanserve.api.errors import install_error_handlers
from leanserve.api.guards import Guards
from leanserve.api.protocol import (
    ChatCompletionResponse,
    CompletionResponse,
    DetokenizeResponse,
    ErrorResponse,
    ModelCard,
    ModelList,
    TokenizeResponse,
)
from leanserve.api.state import ServerState
from leanserve.engine.async_engine import AsyncEngine
from leanserve.engine.cpu_threads import run_on_own_thread
from leanserve.engine.llm_engine import LLMEngine
from leanserve.metrics import log_startup, setup_metrics
from leanserve.settings import ServerSettings

logger = logging.getLogger(__name__)

_ERRORS = {code: {"model": ErrorResponse} for code in (400, 401, 404, 413, 429, 503)}


def build_engine(settings: ServerSettings) -> AsyncEngine:
    """Load the model (slow: runs on a worker thread). Tests replace this to simulate slow loads."""
    return AsyncEngine(LLMEngine(settings.engine_config()))


def freeze_heap() -> None:
    """Exempt everything alive now from garbage collection.

    torch and transformers leave ~400k tracked objects behind; a full collection over them took
    ~250 ms on our CPU host, with every thread stopped (the event loop and /health included), and
    the first burst of requests triggers one. Frozen, they are never scanned again; later passes
    see only objects created while serving.
    """
    gc.collect()
    gc.freeze()


def _engine_ready(app: FastAPI, engine: AsyncEngine, settings: ServerSettings) -> None:
    """Log the startup summary and hand the engine to the metrics (idempotent: setup_metrics may
    have had it already, or ran before it existed)."""
    app.state.engine = engine
    try:
        log_startup(engine, settings)
        app.state.metrics.start(engine)
    except Exception:  # metrics are not worth failing the server over; say so loudly
        logger.exception("metrics could not attach to the engine")


async def _load(app: FastAPI, state: ServerState) -> None:
    try:
        # On a thread of its own that then ends, not an executor thread that lives on (cpu_threads).
        engine = await asyncio.to_thread(run_on_own_thread, build_engine, state.settings)
    except Exception as exc:
        _load_failed(state, exc)
        return
    await asyncio.to_thread(freeze_heap)
    engine.start()
    state.engine = engine
    if state.status == "loading":
        state.status = "ready"
    _engine_ready(app, engine, state.settings)


def _load_failed(state: ServerState, exc: Exception) -> None:
    """Say once, on one line, which model failed and why, then stop the server (exit status 1).

    What fails here is the model's content (a damaged file, an unsupported tensor), so the operator
    needs the file and the reason; the stack is for a developer, at debug level. The process exits
    rather than answering 503 forever, so an orchestrator restarts it and shows the failure.
    """
    state.status = "failed"
    state.load_error = f"{type(exc).__name__}: {exc}"
    logger.error("the model %s failed to load: %s", _describe_model(state.settings.model), state.load_error)
    logger.debug("where the model load failed", exc_info=exc)
    if state.on_load_failure is not None:
        state.on_load_failure()


def _describe_model(model: str | None) -> str:
    if model is not None:
        return model
    from leanserve.model.embedded import EMBEDDED_MODEL_NAME

    return f"{EMBEDDED_MODEL_NAME} (the embedded default)"


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    state: ServerState = app.state.server
    state.bind_loop()
    owned = state.engine is None
    load = None
    if state.engine is None:
        load = asyncio.create_task(_load(app, state))
    else:
        freeze_heap()
        if not state.engine.is_alive and state.engine.error is None:
            state.engine.start()  # an injected engine not yet started: this loop starts and stops it
            owned = True
        _engine_ready(app, state.engine, state.settings)
    try:
        yield
    finally:
        state.begin_drain()  # a no-op after SIGTERM; otherwise refuse what still arrives
        await state.wait_drained()
        if load is not None and not load.done():
            load.cancel()
        if owned and state.engine is not None:
            await state.engine.shutdown()


def create_app(settings: ServerSettings, engine: AsyncEngine | None = None) -> FastAPI:
    """The app; ``engine`` (if given) is used as is, otherwise one is built from ``settings``."""
    app = FastAPI(title="leanserve", version=__version__, lifespan=_lifespan, responses=_ERRORS)
    state = ServerState(settings, engine)
    app.state.server = state
    app.state.engine = engine  # where the metrics look for it
    install_error_handlers(app)
    app.add_middleware(Guards, state=state)

    app.add_api_route("/health", info.health, methods=["GET"])
    app.add_api_route("/version", info.version, methods=["GET"])
    app.add_api_route("/v1/models", info.list_models, methods=["GET"], response_model=ModelList)
    app.add_api_route("/v1/models/{model:path}", info.get_model, methods=["GET"], response_model=ModelCard)
    app.add_api_route(
        "/v1/completions", completions.create_completion, methods=["POST"], response_model=CompletionResponse
    )
    app.add_api_route(
        "/v1/chat/completions", chat.create_chat_completion, methods=["POST"],
        response_model=ChatCompletionResponse,
    )
    app.add_api_route("/tokenize", info.tokenize, methods=["POST"], response_model=TokenizeResponse)
    app.add_api_route("/detokenize", info.detokenize, methods=["POST"], response_model=DetokenizeResponse)
    # With no engine yet, the metrics attach when _load hands it over (_engine_ready).
    setup_metrics(app, engine, settings)
    _document_400_not_422(app)
    return app


def _document_400_not_422(app: FastAPI) -> None:
    """Validation errors are 400s here (errors.py); keep FastAPI's 422 out of the OpenAPI schema."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            for operations in generate()["paths"].values():
                for operation in operations.values():
                    operation.get("responses", {}).pop("422", None)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


class LeanServer(uvicorn.Server):
    """uvicorn's server, with SIGTERM/SIGINT starting our drain before uvicorn's own shutdown."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.state = state
        state.on_load_failure = self._stop

    def _stop(self) -> None:
        self.should_exit = True

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.begin_drain_threadsafe()
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        with super().capture_signals():
            yield
            # uvicorn re-raises the signal after shutdown; a completed drain is a clean exit (0).
            self._captured_signals.clear()


def server_for(app: FastAPI, settings: ServerSettings) -> LeanServer:
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        # Backstop only: our drain aborts what is left at drain_timeout_s, and those answers
        # need a moment to go out.
        timeout_graceful_shutdown=int(settings.drain_timeout_s) + 5,
    )
    return LeanServer(config, app.state.server)


def run_server(settings: ServerSettings) -> int:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s"
    )
    app = create_app(settings)
    server = server_for(app, settings)
    server.run()
    return 1 if app.state.server.status == "failed" else 0
