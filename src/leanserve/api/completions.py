"""POST /v1/completions: prompts in, one engine request per (prompt, sample), OpenAI's body out.

Choices are numbered prompt-major (prompt p, sample j -> index p*n + j), as OpenAI does. ``best_of``
runs that many samples per prompt and keeps the n with the highest cumulative logprob.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from functools import partial

from fastapi import Request
from starlette.responses import Response

from leanserve.api.errors import APIError, bad_request
from leanserve.api.logprobs import CompletionLogprobsBuilder
from leanserve.api.protocol import CompletionChoice, CompletionRequest, CompletionResponse
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
from leanserve.api.tokens import encode
from leanserve.api.usage import UsageCounter
from leanserve.engine.llm_engine import RequestOutput, TokenLogprob
from leanserve.sampling_params import SamplingParams

DEFAULT_MAX_TOKENS = 16
_FIM_TOKENS = ("<fim_prefix>", "<fim_suffix>", "<fim_middle>")


@dataclass
class Prompt:
    text: str  # what echo prints
    token_ids: list[int]


@dataclass
class Sample:
    """One engine request's accumulated output."""

    prompt: int
    text: str = ""
    logprobs: list[TokenLogprob] = field(default_factory=list)
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.text_delta
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.logprobs:
            self.logprobs.extend(out.logprobs)
            self.cumulative_logprob += sum(e.logprob for e in out.logprobs)
        if out.finished:
            self.finish_reason = out.finish_reason


async def _prompts(req: CompletionRequest, tokenizer: object) -> list[Prompt]:
    raw = req.prompt
    if isinstance(raw, str):
        items: list[str | list[int]] = [raw]
    elif raw and all(isinstance(x, int) for x in raw):
        items = [raw]  # type: ignore[list-item]
    else:
        items = list(raw)  # type: ignore[arg-type]
    if not items:
        raise bad_request("the prompt is empty", param="prompt")
    if req.suffix:
        if not all(isinstance(x, str) for x in items):
            raise bad_request("suffix needs text prompts", param="suffix")
        if req.echo:
            raise bad_request("echo cannot be combined with suffix", param="echo")
        vocab = tokenizer.get_vocab()  # type: ignore[attr-defined]
        if not all(t in vocab for t in _FIM_TOKENS):
            raise bad_request(
                "suffix (fill-in-the-middle) is not supported by this model: its tokenizer has no "
                "<fim_prefix>/<fim_suffix>/<fim_middle> tokens",
                param="suffix",
                code="unsupported_parameter",
            )
        items = [f"<fim_prefix>{x}<fim_suffix>{req.suffix}<fim_middle>" for x in items]  # type: ignore[str-bytes-safe]
    prompts = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            prompts.append(Prompt(item, await encode(tokenizer, item, add_special_tokens=True)))
        else:
            if not item:
                raise bad_request(f"prompt {i} is an empty token list", param="prompt")
            prompts.append(Prompt("", list(item)))  # text filled in once validated (ids in range)
    return prompts


async def create_completion(body: CompletionRequest, request: Request) -> Response:
    state: ServerState = request.app.state.server
    engine = state.require_engine()
    state.check_model(body.model)
    tokenizer = engine.tokenizer
    n = body.n or 1
    best_of = body.best_of or n
    if best_of < n:
        raise bad_request(f"best_of ({best_of}) must be >= n ({n})", param="best_of")
    if body.stream and best_of > n:
        raise bad_request("best_of > n cannot be streamed", param="best_of")
    echo = bool(body.echo)
    k = body.logprobs
    prompts = await _prompts(body, tokenizer)

    # best_of ranks by cumulative logprob, so ask for the chosen tokens' logprobs (k=0) even
    # when the client did not.
    engine_logprobs = k if k is not None else (0 if best_of > n else None)
    requests: list[tuple[int, SamplingParams]] = []
    for p, prompt in enumerate(prompts):
        room = engine.max_model_len - len(prompt.token_ids)
        max_tokens = body.max_tokens if body.max_tokens is not None else max(1, min(DEFAULT_MAX_TOKENS, room))
        for j in range(best_of):
            params = build_sampling_params(
                body,
                max_tokens=max_tokens,
                vocab_size=engine.vocab_size,
                logprobs=engine_logprobs,
                prompt_logprobs=k if echo and k is not None else None,
                choice_index=j,
            )
            if j == 0:
                state.validate(prompt.token_ids, params)
            requests.append((p, params))
    for prompt in prompts:
        if not prompt.text:
            prompt.text = tokenizer.decode(prompt.token_ids) if echo else ""
    new_builder = partial(_logprobs_builder, tokenizer, prompts, echo, requests[0][1].skip_special_tokens)

    ticket = state.admit(len(requests))
    request_id = f"cmpl-{uuid.uuid4().hex}"
    model_name = state.served_model_name
    priority = body.priority or 0

    def streams() -> list[AsyncIterator[RequestOutput]]:
        return [
            state.generate(f"{request_id}-{p}-{i}", prompts[p].token_ids, params, priority)
            for i, (p, params) in enumerate(requests)
        ]

    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        events = _stream(streams(), prompts, n, echo, k, new_builder, request_id, model_name, include_usage)
        return SSEResponse(events, on_close=ticket.release)
    try:
        samples = await run_until_disconnect(request.receive, _collect(streams(), requests))
    except ClientDisconnected:
        return Response(status_code=499)  # nobody is listening; the requests are aborted
    finally:
        ticket.release()
    return _response(samples, prompts, n, best_of, echo, k, new_builder, request_id, model_name)


def _logprobs_builder(
    tokenizer: object, prompts: list[Prompt], echo: bool, skip_special_tokens: bool, p: int
) -> CompletionLogprobsBuilder:
    """Prompt ``p``'s builder: its output reads in the prompt's context, after the echoed prompt."""
    prompt = prompts[p]
    return CompletionLogprobsBuilder(
        tokenizer, prompt.token_ids, skip_special_tokens, text_start=len(prompt.text) if echo else 0
    )


async def _collect(
    streams: list[AsyncIterator[RequestOutput]], requests: list[tuple[int, SamplingParams]]
) -> tuple[list[Sample], UsageCounter]:
    samples = [Sample(prompt=p) for p, _ in requests]
    usage = UsageCounter()
    async for i, out in merge(streams):
        samples[i].add(out)
        if out.finished:
            usage.add(samples[i].prompt, out)
    return samples, usage


def _response(
    collected: tuple[list[Sample], UsageCounter],
    prompts: list[Prompt],
    n: int,
    best_of: int,
    echo: bool,
    k: int | None,
    new_builder: Callable[[int], CompletionLogprobsBuilder],
    request_id: str,
    model_name: str,
) -> Response:
    samples, usage = collected
    choices = []
    for p, prompt in enumerate(prompts):
        group = samples[p * best_of : (p + 1) * best_of]
        if best_of > n:
            group = sorted(group, key=lambda s: s.cumulative_logprob, reverse=True)[:n]
        for j, s in enumerate(group):
            logprobs = None
            if k is not None:
                builder = new_builder(p)
                if echo:
                    builder.add_prompt(prompt.token_ids, s.prompt_logprobs or [None])
                builder.add(s.logprobs, s.text, finished=True)
                logprobs = builder.take()
            choices.append(
                CompletionChoice(
                    index=p * n + j,
                    text=(prompt.text if echo else "") + s.text,
                    logprobs=logprobs,
                    finish_reason=s.finish_reason,  # type: ignore[arg-type]
                )
            )
    body = CompletionResponse(id=request_id, model=model_name, choices=choices, usage=usage.usage())
    return Response(body.model_dump_json(), media_type="application/json")


async def _stream(
    streams: list[AsyncIterator[RequestOutput]],
    prompts: list[Prompt],
    n: int,
    echo: bool,
    k: int | None,
    new_builder: Callable[[int], CompletionLogprobsBuilder],
    request_id: str,
    model_name: str,
    include_usage: bool,
) -> AsyncIterator[str]:
    builders: dict[int, CompletionLogprobsBuilder] = {}
    usage = UsageCounter()
    try:
        async for i, out in merge(streams):
            p = i // n  # streaming has best_of == n, so engine request i is choice i
            text = ""
            builder = builders.get(i)
            if builder is None:
                builder = builders[i] = new_builder(p)
                if echo:
                    text = prompts[p].text
                    if k is not None:
                        builder.add_prompt(prompts[p].token_ids, out.prompt_logprobs or [None])
            text += out.text_delta
            if k is not None:
                builder.add(out.logprobs or [], out.text_delta, out.finished)
            logprobs = builder.take() if k is not None else None
            if out.finished:
                usage.add(p, out)
            if not text and not out.finished and not (logprobs and logprobs.tokens):
                continue  # held-back text (a possible stop string) and nothing else to say
            choice = CompletionChoice(
                index=i,
                text=text,
                logprobs=logprobs,
                finish_reason=out.finish_reason if out.finished else None,  # type: ignore[arg-type]
            )
            yield sse(CompletionResponse(id=request_id, model=model_name, choices=[choice]))
        if include_usage:
            yield sse(CompletionResponse(id=request_id, model=model_name, choices=[], usage=usage.usage()))
    except APIError as exc:
        yield sse_error(exc)
    yield DONE
