"""Bounded request preparation, so a burst of arrivals cannot starve /health.

The event loop runs ready tasks first-in first-out. When 200 requests land at once, each one's
synchronous preparation (parse, validate, tokenize, submit: about a millisecond) runs before a health
probe that arrived just after them, and the probe waits for all of it. Here only a few requests
prepare at a time; the rest wait on a semaphore, which costs nothing while waiting, and a probe
slips in between. A request holds its slot until it has been handed to the engine (the endpoint
calls ``prepared()`` just before it starts waiting) or until it ends, whichever comes first.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextvars import ContextVar

_release: ContextVar[Callable[[], None] | None] = ContextVar("leanserve_prepare_release", default=None)

# Enough to keep the loop busy with no queueing of its own; few enough that a probe waits for at
# most this many preparations.
PREPARE_SLOTS = 4


class PrepareGate:
    def __init__(self, slots: int = PREPARE_SLOTS) -> None:
        self.slots = asyncio.Semaphore(slots)

    @contextlib.asynccontextmanager
    async def hold(self) -> AsyncIterator[None]:
        await self.slots.acquire()
        held = True

        def release() -> None:
            nonlocal held
            if held:
                held = False
                self.slots.release()

        token = _release.set(release)
        try:
            yield
        finally:
            release()
            _release.reset(token)


def prepared() -> None:
    """The current request is with the engine now: let the next one prepare."""
    release = _release.get()
    if release is not None:
        release()
