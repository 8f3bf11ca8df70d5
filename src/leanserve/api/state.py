"""What the HTTP layer knows about the server: the engine, whether it may admit, and who is in flight.

Admission is counted in sequences (``n`` and ``best_of`` each make one engine request per choice) so
the bound holds the engine's queue, not the number of HTTP connections. Every engine request goes
through ``generate`` here so a drain can find and abort what is left when its timeout ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Literal

from leanserve.api.errors import APIError, bad_request
from leanserve.engine.async_engine import AsyncEngine, EngineDeadError
from leanserve.engine.llm_engine import RequestError, RequestOutput
from leanserve.sampling_params import SamplingParams
from leanserve.settings import ServerSettings

logger = logging.getLogger(__name__)

Status = Literal["loading", "ready", "failed", "draining"]

# Seconds a client is told to wait before retrying a 429.
_RETRY_AFTER_S = 1


class RequestAborted(Exception):
    """The engine ended a request with ``finish_reason="abort"`` (a drain ran out of time)."""


class Ticket:
    """Places held in the admission queue; ``release`` is idempotent."""

    def __init__(self, state: ServerState, num_seqs: int) -> None:
        self.state = state
        self.num_seqs = num_seqs

    def release(self) -> None:
        self.state.admitted_seqs -= self.num_seqs
        self.num_seqs = 0


class ServerState:
    def __init__(self, settings: ServerSettings, engine: AsyncEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine
        self.status: Status = "ready" if engine is not None else "loading"
        self.load_error: str | None = None
        self.admitted_seqs = 0  # sequences admitted by the API and not yet answered
        self.active: set[str] = set()  # engine request ids in flight
        self.started_at = time.time()
        self._drain_task: asyncio.Task[None] | None = None
        self.drain_expired = False  # the drain timeout passed: what is left is aborted
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_load_failure: Callable[[], None] | None = None  # run_server stops the process

    # ---- model names --------------------------------------------------------------------------
    @property
    def served_model_name(self) -> str:
        return self.settings.served_model_name or "default"

    def accepted_names(self) -> set[str]:
        names = {self.served_model_name}
        if self.engine is not None:
            names.add(self.engine.model_dir.name)
        return names

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.accepted_names():
            raise APIError(
                404,
                f"The model `{model}` does not exist. This server serves `{self.served_model_name}`.",
                param="model",
                code="model_not_found",
            )

    # ---- health -------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.status == "ready" and self.engine is not None and self.engine.is_alive

    def require_engine(self) -> AsyncEngine:
        """The engine, or the 503 that explains why there is none to use."""
        if self.status == "loading":
            raise APIError(503, "the model is still loading; retry shortly", code="model_loading",
                           headers={"Retry-After": "5"})
        if self.status == "draining":
            raise APIError(503, "the server is shutting down", code="shutting_down")
        if self.status == "failed" or self.engine is None:
            raise APIError(503, f"the model failed to load: {self.load_error}", code="engine_failed")
        if not self.engine.is_alive:
            raise APIError(503, "the engine has stopped; the server must be restarted", code="engine_dead")
        return self.engine

    # ---- admission ----------------------------------------------------------------------------
    def admit(self, num_seqs: int) -> Ticket:
        """Hold ``num_seqs`` places in the queue until the ticket is released (or raise 429)."""
        engine = self.require_engine()
        limit = self.settings.max_queued_requests
        if num_seqs > limit:
            raise bad_request(
                f"this request asks for {num_seqs} sequences (prompts x max(n, best_of)); "
                f"the server takes at most {limit} at once",
                param="n",
            )
        load = max(engine.num_unfinished, self.admitted_seqs)
        if load + num_seqs > limit:
            raise APIError(
                429,
                f"the server is at capacity ({load} sequences queued or running, limit {limit}); "
                f"retry after {_RETRY_AFTER_S}s",
                code="rate_limit_exceeded",
                headers={"Retry-After": str(_RETRY_AFTER_S)},
            )
        self.admitted_seqs += num_seqs
        return Ticket(self, num_seqs)

    # ---- engine requests ----------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """The engine's own checks, run before any response starts (so a stream can still 400)."""
        try:
            self.require_engine().validate(prompt_token_ids, params)
        except RequestError as exc:
            raise bad_request(str(exc), param=exc.param, code=exc.code) from exc

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int
    ) -> AsyncIterator[RequestOutput]:
        # Not require_engine(): a request admitted before a drain began may still start during it.
        engine = self.engine
        if self.drain_expired:
            raise APIError(503, "the server shut down before this request started", code="shutting_down")
        if engine is None or not engine.is_alive:
            raise APIError(503, "the engine has stopped; the server must be restarted", code="engine_dead")
        self.active.add(request_id)
        try:
            # aclosing: leaving early must end the engine's stream now (abort, free blocks), not at GC.
            stream = engine.generate(request_id, prompt_token_ids, params, priority=priority)
            async with contextlib.aclosing(stream):
                async for output in stream:
                    if output.finish_reason == "abort":
                        raise RequestAborted(request_id)
                    yield output
        except RequestError as exc:
            raise bad_request(str(exc), param=exc.param, code=exc.code) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc), code="engine_error") from exc
        except RequestAborted as exc:
            raise APIError(503, "the server shut down before this request finished",
                           code="shutting_down") from exc
        finally:
            self.active.discard(request_id)

    # ---- drain --------------------------------------------------------------------------------
    def bind_loop(self) -> None:
        self._loop = asyncio.get_running_loop()

    def begin_drain_threadsafe(self) -> None:
        """From a signal handler or another thread: stop admitting, then drain on the event loop."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self.begin_drain)

    def begin_drain(self) -> None:
        if self._drain_task is not None:
            return
        if self.status in ("ready", "loading"):
            self.status = "draining"
        logger.info("draining: %d sequences in flight, up to %.1fs", self.admitted_seqs,
                    self.settings.drain_timeout_s)
        self._drain_task = asyncio.get_running_loop().create_task(self._drain())

    async def _drain(self) -> None:
        # Admitted requests count from admission to their last byte, so one still being prepared
        # (or whose answer is still going out) is waited for too.
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while (self.active or self.admitted_seqs) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.active or self.admitted_seqs:
            self.drain_expired = True
            logger.warning("drain timeout: aborting %d requests", len(self.active))
            for request_id in list(self.active):
                if self.engine is not None:
                    self.engine.abort(request_id)

    async def wait_drained(self) -> None:
        if self._drain_task is not None:
            await self._drain_task
