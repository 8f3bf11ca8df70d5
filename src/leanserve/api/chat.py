"""POST /v1/chat/completions: messages through the model's chat template, n samples, OpenAI's body out.

Without ``max_tokens``/``max_completion_tokens`` a reply may use the rest of the context, as with
OpenAI (the model's end-of-turn token normally ends it much sooner).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from starlette.responses import Response

from leanserve.api.errors import APIError, bad_request
from leanserve.api.logprobs import OutputPieces, chat_logprobs
from leanserve.api.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
)
from leanserve.api.sampling import build_sampling_params
from leanserve.api.state import ServerState
from leanserve.api.streaming import (
    DONE,
    ClientDisconnected,
    SSEResponse,
    merge,
    run_until_disconnect,
    sse,
    sse_error,
)
from leanserve.api.tokens import TokenBytes, encode, render_chat
from leanserve.api.usage import UsageCounter
from leanserve.engine.llm_engine import RequestOutput


@dataclass
class Reply:
    text: str = ""
    logprobs: list[ChatTokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None


def _check_unsupported(body: ChatCompletionRequest) -> None:
    if body.tools:
        raise bad_request("tools are not supported by this server", param="tools", code="unsupported_parameter")
    fmt = (body.response_format or {}).get("type", "text")
    if fmt != "text":
        raise bad_request(
            f"response_format {fmt!r} is not supported (only 'text')",
            param="response_format",
            code="unsupported_parameter",
        )
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs=true", param="top_logprobs")


async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.server
    engine = state.require_engine()
    state.check_model(body.model)
    _check_unsupported(body)
    tokenizer = engine.tokenizer
    prompt_ids = await encode(tokenizer, render_chat(tokenizer, body.messages), add_special_tokens=False)
    n = body.n or 1
    top_k = (body.top_logprobs or 0) if body.logprobs else None
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    max_tokens = requested if requested is not None else max(1, engine.max_model_len - len(prompt_ids))
    params = [
        build_sampling_params(
            body, max_tokens=max_tokens, vocab_size=engine.vocab_size, logprobs=top_k, choice_index=i
        )
        for i in range(n)
    ]
    state.validate(prompt_ids, params[0])
    logprobs = _ChoiceLogprobs(tokenizer, prompt_ids, params[0].skip_special_tokens, n, top_k)

    ticket = state.admit(n)  # from here on every path releases it
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    model_name = state.served_model_name
    priority = body.priority or 0
    streams = [
        state.generate(f"{request_id}-{i}", prompt_ids, p, priority) for i, p in enumerate(params)
    ]
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(streams, n, logprobs, request_id, model_name, include_usage)
        return SSEResponse(events, on_close=ticket.release)
    try:
        replies, usage = await run_until_disconnect(request.receive, _collect(streams, n, logprobs))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody is listening; the requests are aborted
    finally:
        ticket.release()
    choices = [
        ChatChoice(
            index=i,
            message=ChatResponseMessage(content=r.text),
            logprobs=ChatLogprobs(content=r.logprobs) if top_k is not None else None,
            finish_reason=r.finish_reason,  # type: ignore[arg-type]
        )
        for i, r in enumerate(replies)
    ]
    response = ChatCompletionResponse(id=request_id, model=model_name, choices=choices, usage=usage.usage())
    return Response(response.model_dump_json(), media_type="application/json")


class _ChoiceLogprobs:
    """Each choice's logprobs as its text arrives (``None`` from ``add`` when none were asked for)."""

    def __init__(
        self, tokenizer: object, prompt_ids: list[int], skip_special_tokens: bool, n: int, top_k: int | None
    ) -> None:
        self.top_k = top_k
        if top_k is None:
            return  # nothing asked for: no per-token work at all
        self.token_bytes = TokenBytes(tokenizer)
        # One per choice: each reads its tokens in the context of its own earlier ones.
        self.outputs = [OutputPieces(tokenizer, prompt_ids, skip_special_tokens) for _ in range(n)]

    def add(self, i: int, out: RequestOutput) -> list[ChatTokenLogprob] | None:
        if self.top_k is None:
            return None
        pieces = self.outputs[i].add(out.logprobs or [], out.text_delta, out.finished)
        return chat_logprobs(pieces, self.token_bytes, self.top_k)


async def _collect(
    streams: list[AsyncIterator[RequestOutput]], n: int, logprobs: _ChoiceLogprobs
) -> tuple[list[Reply], UsageCounter]:
    replies = [Reply() for _ in range(n)]
    usage = UsageCounter()
    async for i, out in merge(streams):
        r = replies[i]
        r.text += out.text_delta
        r.logprobs.extend(logprobs.add(i, out) or [])
        if out.finished:
            r.finish_reason = out.finish_reason
            usage.add(0, out)
    return replies, usage


async def _stream(
    streams: list[AsyncIterator[RequestOutput]],
    n: int,
    logprobs: _ChoiceLogprobs,
    request_id: str,
    model_name: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    def chunk(choice: ChatChunkChoice) -> str:
        return sse(ChatCompletionChunk(id=request_id, model=model_name, choices=[choice]))

    usage = UsageCounter()
    try:
        # The role comes first, before any token, so the client knows the reply has begun.
        for i in range(n):
            yield chunk(ChatChunkChoice(index=i, delta={"role": "assistant", "content": ""}))
        async for i, out in merge(streams):
            content = logprobs.add(i, out)
            if out.text_delta or content:
                chunk_logprobs = ChatLogprobs(content=content) if content is not None else None
                yield chunk(ChatChunkChoice(index=i, delta={"content": out.text_delta}, logprobs=chunk_logprobs))
            if out.finished:
                usage.add(0, out)
                yield chunk(ChatChunkChoice(index=i, delta={}, finish_reason=out.finish_reason))  # type: ignore[arg-type]
        if include_usage:
            yield sse(ChatCompletionChunk(id=request_id, model=model_name, choices=[], usage=usage.usage()))
    except APIError as exc:
        yield sse_error(exc)
    yield DONE
