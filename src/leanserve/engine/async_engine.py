"""The engine as the HTTP layer sees it: an async iterator of outputs per request.

The step loop runs on its own thread so the event loop stays free for HTTP (health checks answer in
milliseconds while the model computes). Requests and aborts reach the loop through an inbox the loop
drains between steps; outputs come back through ``call_soon_threadsafe`` into one asyncio queue per
request. An accepted request always ends: with its last output, or with an exception.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from leanserve.engine.llm_engine import LLMEngine, RequestError, RequestOutput, StepStats
from leanserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

StepListener = Callable[[StepStats, list[RequestOutput], "AsyncEngine"], None]


class EngineDeadError(RuntimeError):
    """The step loop has stopped; no request can complete."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._inbox: deque[tuple[Any, ...]] = deque()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.error: BaseException | None = None
        # Called on the engine thread after every step; listeners must only record, never block.
        self.step_listeners: list[StepListener] = []
        self.num_unfinished = 0  # accepted by generate() and not yet ended (event-loop side)
        self.busy_seconds = 0.0
        self.started_at = time.monotonic()

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="leanserve-engine", daemon=True)
        self._thread.start()

    async def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10.0)

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    # What the HTTP layer may know of the model, without reaching into the engine.
    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def vocab_size(self) -> int:
        return self.engine.model_config.vocab_size

    @property
    def model_dir(self) -> Any:
        return self.engine.model_dir

    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ``RequestError`` for a request the engine would refuse (before any response starts)."""
        self.engine.validate(prompt_token_ids, params)

    # ---- requests -------------------------------------------------------------------------------
    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's incremental outputs; the last has ``finished=True``.

        Raises ``RequestError`` at once for a request the engine cannot take. Leaving the iteration
        early (client gone, task cancelled) aborts the request and frees its KV blocks.
        """
        if not self.is_alive:
            raise EngineDeadError("the engine is not running")
        self.engine.validate(prompt_token_ids, params)
        if request_id in self._streams:
            raise RequestError(f"duplicate request id {request_id!r}")
        queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._streams[request_id] = queue
        self.num_unfinished += 1
        self._inbox.append(("add", request_id, list(prompt_token_ids), params, priority, time.monotonic()))
        self._wake.set()
        finished = False
        try:
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            self.num_unfinished -= 1
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._inbox.append(("abort", request_id))
        self._wake.set()

    # ---- the loop (engine thread) ---------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._drain_inbox()
                if not engine.has_unfinished_requests():
                    self._wake.wait(timeout=0.5)
                    self._wake.clear()
                    continue
                start = time.monotonic()
                try:
                    outputs = engine.step()
                except Exception as exc:  # a bug or device failure: fail the batch, keep serving
                    logger.exception("engine step failed; failing the requests in flight")
                    self._fail_all(exc)
                    continue
                self.busy_seconds += time.monotonic() - start
                hold = engine.scheduler.admission_hold_s
                if engine.last_step.num_seqs == 0 and hold > 0:
                    # The batching window holds new requests and nothing else runs: sleep until it
                    # closes or another request arrives.
                    self._wake.wait(timeout=hold)
                    self._wake.clear()
                if outputs:
                    self._post(self._deliver, outputs)
                for listener in self.step_listeners:
                    listener(engine.last_step, outputs, self)
        except BaseException as exc:
            logger.exception("engine loop died")
            self.error = exc
            self._fail_all(exc)

    def _drain_inbox(self) -> None:
        while self._inbox:
            command = self._inbox.popleft()
            if command[0] == "add":
                _, request_id, prompt, params, priority, arrival = command
                try:
                    self.engine.add_request(request_id, prompt, params, priority, arrival)
                except RequestError as exc:
                    self._post(self._deliver_error, request_id, exc)
            else:
                output = self.engine.abort_request(command[1])
                if output is not None:
                    self._post(self._deliver, [output])
                    # Aborts happen between steps: report them as an empty step so metrics count them.
                    for listener in self.step_listeners:
                        listener(StepStats(), [output], self)

    def _fail_all(self, exc: BaseException) -> None:
        for request_id in list(self.engine.seqs):
            self.engine.abort_request(request_id)
            error = EngineDeadError(f"the engine failed while running this request: {exc!r}")
            self._post(self._deliver_error, request_id, error)

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(fn, *args)

    # ---- event-loop side --------------------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for output in outputs:
            queue = self._streams.get(output.request_id)
            if queue is not None:
                queue.put_nowait(output)

    def _deliver_error(self, request_id: str, exc: BaseException) -> None:
        queue = self._streams.get(request_id)
        if queue is not None:
            queue.put_nowait(exc)
