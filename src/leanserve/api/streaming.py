"""Server-sent events, fan-in of several engine streams, and leaving when the client does.

A client that goes away must stop its generation at once so its KV blocks return to the pool. The
server does not notice a closed socket until it writes to it, and before the first token there is
nothing to write, so both the streaming and the non-streaming paths watch ``receive()`` for
``http.disconnect`` beside the work and cancel the work when it arrives. Cancelling reaches down to
``AsyncEngine.generate``, whose cleanup aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from leanserve.api.errors import APIError
from leanserve.api.pacing import prepared

logger = logging.getLogger(__name__)

T = TypeVar("T")

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict[str, Any]) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


def sse_error(exc: BaseException) -> str:
    """The last event of a stream that failed after its 200 went out (OpenAI's clients raise on it)."""
    if not isinstance(exc, APIError):
        logger.error("stream failed", exc_info=exc)
        exc = APIError(500, f"internal error: {type(exc).__name__}", code="internal_error")
    return sse(exc.body())


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


class ClientDisconnected(Exception):
    """The client closed the connection before the answer was ready."""


async def run_until_disconnect(receive: Receive, work: Awaitable[T]) -> T:
    """Await ``work``; if the client disconnects first, cancel it and raise ``ClientDisconnected``."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_for_disconnect(receive))
    prepared()
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
    if task.cancelled():
        raise ClientDisconnected()
    return task.result()


async def merge(streams: list[AsyncIterator[T]]) -> AsyncIterator[tuple[int, T]]:
    """Interleave several async iterators as ``(index, item)`` in arrival order.

    The first exception from any stream is raised here; leaving early (or failing) cancels all
    the others, which aborts their engine requests.
    """
    queue: asyncio.Queue[tuple[int, Any, BaseException | None, bool]] = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[T]) -> None:
        try:
            async for item in stream:
                queue.put_nowait((index, item, None, False))
        except Exception as exc:
            queue.put_nowait((index, None, exc, True))
        else:
            queue.put_nowait((index, None, None, True))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            index, item, exc, done = await queue.get()
            if exc is not None:
                raise exc
            if done:
                remaining -= 1
                continue
            yield index, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class SSEResponse(Response):
    """Streams ``events`` (already-encoded SSE strings) and stops them if the client disconnects."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None] | None = None) -> None:
        # Not Response.__init__: it would set a Content-Length for the empty body.
        self.status_code = 200
        self.background = None
        self.events = events
        self.on_close = on_close
        self.init_headers({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        prepared()
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in (pump, watcher):
                t.cancel()
            await asyncio.gather(pump, watcher, return_exceptions=True)
            with contextlib.suppress(Exception):
                await self.events.aclose()  # type: ignore[attr-defined]
            if self.on_close is not None:
                self.on_close()

    async def _pump(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        try:
            async for event in self.events:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
        except Exception as exc:  # the generator should have sent its own error event; be safe
            await send({"type": "http.response.body", "body": sse_error(exc).encode(), "more_body": True})
            await send({"type": "http.response.body", "body": DONE.encode(), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
