"""Checks that run before any endpoint: the API key on /v1/*, and the request-body size limit;
then POSTs take a preparation slot (see ``pacing``).

A pure ASGI middleware: a 401 costs no body read, and an oversized body is refused with a 413
while it streams in, before it is held in memory whole.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from leanserve.api.errors import APIError
from leanserve.api.pacing import PrepareGate
from leanserve.api.state import ServerState


def _protected(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


class Guards:
    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state
        self.gate = PrepareGate()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        key = self.state.settings.api_key
        if key and _protected(scope["path"]) and not _authorized(headers.get(b"authorization"), key):
            error = APIError(
                401,
                "missing or incorrect API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await error.response()(scope, receive, send)
            return
        if scope.get("method") not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return

        limit = self.state.settings.max_request_body_bytes
        # Connection: close, as the rest of the body is left unread on the socket.
        too_large = APIError(413, f"the request body is larger than the limit of {limit} bytes",
                             code="request_too_large", headers={"Connection": "close"})
        declared = headers.get(b"content-length")
        if declared is not None:
            try:
                if int(declared) > limit:
                    await too_large.response()(scope, receive, send)
                    return
            except ValueError:
                await APIError(400, "invalid Content-Length header").response()(scope, receive, send)
                return
        # Read the body here (bounded), then replay it to the app; later receive() calls go to the
        # server as usual, so the endpoints can still see a disconnect.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await too_large.response()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        async with self.gate.hold():
            await self.app(scope, replay, send)


def _authorized(header: bytes | None, key: str) -> bool:
    if not header:
        return False
    scheme, _, token = header.decode("latin-1").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())
