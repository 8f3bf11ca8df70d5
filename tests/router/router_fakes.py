"""Fake replicas (small FastAPI apps) and a uvicorn-in-a-thread runner on a free loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from tests.server_thread import ServerThread, free_port  # noqa: F401 - re-exported for the tests here


@dataclass
class FakeReplica:
    """A stand-in for `leanserve serve` whose behaviour a test flips at run time."""

    name: str
    healthy: bool = True
    fail_status: int | None = None  # answer completions with this status instead
    drop_before_first_chunk: bool = False  # streaming: send 200 headers, then die before any byte
    waiting: int = 0
    running: int = 0
    kv_usage: float = 0.0
    expose_metrics: bool = True
    stream_gate: threading.Event | None = None  # when set, each chunk after the first waits for it
    chunks: int = 3
    chunk_delay_s: float = 0.0  # streaming: pause before each chunk after the first
    die_after: int | None = None  # streaming: after this many chunks, half an event, then the connection breaks
    omit_done: bool = False  # streaming: end the body cleanly but without `data: [DONE]`
    hold_until_disconnect: bool = False  # answer nothing until the client (the router) hangs up
    hits: int = 0
    hit_paths: list[str] = field(default_factory=list)
    disconnects: int = 0  # requests whose client went away while they were held

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health():
            return JSONResponse({"ok": self.healthy}, status_code=200 if self.healthy else 503)

        @app.get("/metrics")
        async def metrics():
            if not self.expose_metrics:
                return PlainTextResponse("# nothing here\n")
            return PlainTextResponse(
                "# HELP vllm:num_requests_waiting Waiting.\n# TYPE vllm:num_requests_waiting gauge\n"
                f'vllm:num_requests_waiting{{model_name="m"}} {self.waiting}\n'
                "# HELP vllm:num_requests_running Running.\n# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{model_name="m"}} {self.running}\n'
                "# HELP vllm:kv_cache_usage_perc KV.\n# TYPE vllm:kv_cache_usage_perc gauge\n"
                f'vllm:kv_cache_usage_perc{{model_name="m"}} {self.kv_usage}\n'
            )

        @app.get("/v1/models")
        async def models():
            self.hits += 1
            return {"object": "list", "data": [{"id": "fake", "object": "model", "owned_by": self.name}]}

        async def complete(request: Request):
            self.hits += 1
            self.hit_paths.append(request.url.path)
            body = await request.json()
            if self.hold_until_disconnect:
                return await self._hold(request)
            if self.fail_status is not None:
                return JSONResponse({"error": {"message": "busy", "type": "overloaded", "param": None,
                                               "code": None}}, status_code=self.fail_status)
            if not body.get("stream"):
                return {"id": "cmpl-1", "object": "text_completion", "model": "fake",
                        "choices": [{"index": 0, "text": self.name, "finish_reason": "stop"}]}
            return StreamingResponse(self._events(), media_type="text/event-stream")

        app.add_api_route("/v1/completions", complete, methods=["POST"])
        app.add_api_route("/v1/chat/completions", complete, methods=["POST"])
        return app

    async def _hold(self, request: Request) -> Response:
        """Like a replica generating a long answer: it only stops early if its client disconnects."""
        async def disconnected() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(disconnected(), timeout=10)
            self.disconnects += 1
        return JSONResponse({"error": {"message": "held", "type": "test", "param": None, "code": None}},
                            status_code=500)

    async def _events(self):
        if self.drop_before_first_chunk:
            raise RuntimeError("replica died after sending headers")
        for i in range(self.chunks):
            if i and self.stream_gate is not None:
                while not self.stream_gate.is_set():
                    await asyncio.sleep(0.005)
                self.stream_gate.clear()
            if i and self.chunk_delay_s:
                await asyncio.sleep(self.chunk_delay_s)
            if i == self.die_after:
                yield b'data: {"choices": [{"ind'  # uvicorn sends it, then drops the connection mid-body
                raise RuntimeError("replica died mid-stream")
            data = {"choices": [{"index": 0, "text": f"{self.name}-{i}"}]}
            yield f"data: {json.dumps(data)}\n\n".encode()
        if not self.omit_done:
            yield b"data: [DONE]\n\n"
