"""The small endpoints: health, version, models, tokenize and detokenize."""

from __future__ import annotations

from fastapi import Request
from fastapi.responses import JSONResponse

from leanserve import __version__
from leanserve.api.errors import APIError, bad_request
from leanserve.api.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from leanserve.api.state import ServerState
from leanserve.api.tokens import encode, render_chat


def _state(request: Request) -> ServerState:
    return request.app.state.server


async def health(request: Request) -> JSONResponse:
    """200 while the engine loop runs; 503 while loading, draining, or after the engine died.

    Async and touching nothing but flags, so it answers at once however busy the engine is.
    """
    state = _state(request)
    if state.alive:
        return JSONResponse({"status": "ok"})
    status = "dead" if state.status == "ready" else state.status
    body: dict[str, str] = {"status": status}
    if state.load_error:
        body["error"] = state.load_error
    return JSONResponse(body, status_code=503)


async def version() -> JSONResponse:
    return JSONResponse({"version": __version__})


def _card(state: ServerState) -> ModelCard:
    engine = state.engine
    return ModelCard(
        id=state.served_model_name,
        created=int(state.started_at),
        root=str(engine.model_dir) if engine is not None else state.settings.model,
        max_model_len=engine.max_model_len if engine is not None else None,
    )


async def list_models(request: Request) -> ModelList:
    return ModelList(data=[_card(_state(request))])


async def get_model(model: str, request: Request) -> ModelCard:
    state = _state(request)
    state.check_model(model)
    return _card(state)


async def tokenize(body: TokenizeRequest, request: Request) -> TokenizeResponse:
    state = _state(request)
    engine = state.require_engine()
    state.check_model(body.model)
    tokenizer = engine.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("send exactly one of 'prompt' and 'messages'", param="prompt")
    if body.messages is not None:
        if not body.messages:
            raise bad_request("messages is empty", param="messages")
        text = render_chat(tokenizer, body.messages, add_generation_prompt=body.add_generation_prompt is not False)
        special = bool(body.add_special_tokens)  # the template already wrote them
    else:
        text = body.prompt or ""
        special = body.add_special_tokens is not False
    tokens = await encode(tokenizer, text, add_special_tokens=special)
    return TokenizeResponse(count=len(tokens), max_model_len=engine.max_model_len, tokens=tokens)


async def detokenize(body: DetokenizeRequest, request: Request) -> DetokenizeResponse:
    state = _state(request)
    engine = state.require_engine()
    state.check_model(body.model)
    vocab = engine.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise APIError(400, f"token ids out of range [0, {vocab}): {bad[:5]}", param="tokens")
    return DetokenizeResponse(prompt=engine.tokenizer.decode(body.tokens))
