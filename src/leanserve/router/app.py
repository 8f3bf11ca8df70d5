"""FastAPI app in front of the replicas: the OpenAI routes, the router's /health and /metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response

from leanserve.router.proxy import Router, RouterConfig, openai_error


def create_app(config: RouterConfig, transport: httpx.AsyncBaseTransport | None = None) -> FastAPI:
    router = Router(config, transport=transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await router.start()
        try:
            yield
        finally:
            await router.stop()

    app = FastAPI(title="leanserve router", lifespan=lifespan)
    app.state.router = router

    async def proxied(request: Request) -> Response:
        try:
            body = await request.body()
        except ClientDisconnect:  # gone before its request was whole: nothing to forward, nobody to answer
            return Response(status_code=499)
        return await router.forward(request.method, request.url.path, body, request.headers, request.receive)

    for path in ("/v1/completions", "/v1/chat/completions"):
        app.add_api_route(path, proxied, methods=["POST"], include_in_schema=False)
    app.add_api_route("/v1/models", proxied, methods=["GET"], include_in_schema=False)

    @app.get("/health")
    async def health() -> JSONResponse:
        # The router is ready while it has somewhere to send traffic; its own liveness is implied.
        healthy = sum(r.healthy for r in router.replicas)
        return JSONResponse({"status": "ok" if healthy else "unavailable", "healthy_replicas": healthy,
                             "replicas": len(router.replicas)}, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(router.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return openai_error(exc.status_code, str(exc.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return openai_error(400, str(exc), "invalid_request_error")

    return app
