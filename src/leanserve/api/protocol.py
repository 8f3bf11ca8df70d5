"""Request and response bodies, shaped like OpenAI's (plus vLLM's common sampling extensions).

Requests validate strictly (a string is not a number, a bool is not an int, NaN is not a float) so
that every malformed value is a clear 400 before it reaches the engine. Unknown fields are ignored,
as clients such as evaluation harnesses send extras. ``null`` means "use the default" everywhere.
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

_INT64 = 1 << 63
_SURROGATE = re.compile("[\ud800-\udfff]")


def valid_unicode(text: str) -> str:
    """Refuse lone surrogates: JSON's "\\ud800" escape parses to one, but it is not a character,
    so no tokenizer (nor UTF-8) can take it. Every text field is a ``Str``, so this is the one check."""
    found = _SURROGATE.search(text)
    if found is None:
        return text
    raise PydanticCustomError(
        "invalid_unicode",
        f"text must be valid Unicode: it contains a lone surrogate (U+{ord(found.group()):04X}) "
        f"at character {found.start()}",
    )

# Strict scalars: JSON numbers for numbers, no NaN or infinities.
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Int = Annotated[int, Field(strict=True, ge=-_INT64, lt=_INT64)]
Bool = Annotated[bool, Field(strict=True)]
Str = Annotated[str, Field(strict=True), AfterValidator(valid_unicode)]
TokenIds = list[Annotated[int, Field(strict=True)]]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Request):
    include_usage: Bool | None = False


class SamplingFields(_Request):
    """What completions and chat share: sampling, stopping, and scheduling."""

    model: Str | None = None
    temperature: Annotated[Float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[Float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[Int, Field(ge=1, le=128)] | None = 1
    stream: Bool | None = False
    stream_options: StreamOptions | None = None
    stop: Str | list[Str] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2.0, le=2.0)] | None = None
    # Keys are token ids as strings (JSON object keys); values are added to the logits.
    logit_bias: dict[Str, Annotated[Float, Field(ge=-100.0, le=100.0)]] | None = None
    seed: Int | None = None
    user: Str | None = None
    # Extensions (vLLM's names). top_k: 0 or -1 = no limit.
    top_k: Annotated[Int, Field(ge=-1)] | None = None
    min_p: Annotated[Float, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0.0, le=100.0)] | None = None
    ignore_eos: Bool | None = False
    stop_token_ids: TokenIds | None = None
    min_tokens: Annotated[Int, Field(ge=0)] | None = None
    include_stop_str_in_output: Bool | None = False
    skip_special_tokens: Bool | None = True
    # Lower runs sooner (the scheduler orders its queue by (priority, arrival)).
    priority: Int | None = 0


class CompletionRequest(SamplingFields):
    prompt: Str | list[Str] | TokenIds | list[TokenIds]
    suffix: Str | None = None
    max_tokens: Annotated[Int, Field(ge=0)] | None = None
    best_of: Annotated[Int, Field(ge=1, le=128)] | None = None
    logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    echo: Bool | None = False


class ContentPart(_Request):
    type: Str
    text: Str | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    # Required for every role, as OpenAI does: only an assistant message with tool_calls may omit it,
    # and this server takes no tools. "" is a message with empty content.
    content: Str | list[ContentPart]
    name: Str | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[Int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[Int, Field(ge=1)] | None = None
    logprobs: Bool | None = False
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None


class TokenizeRequest(_Request):
    """vLLM's body: either ``prompt`` or ``messages`` (rendered through the chat template)."""

    model: Str | None = None
    prompt: Str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: Bool | None = None
    add_generation_prompt: Bool | None = True


class DetokenizeRequest(_Request):
    model: Str | None = None
    tokens: TokenIds


# ---- responses ----------------------------------------------------------------------------------


def _now() -> int:
    return int(time.time())


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class ChatResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]  # {"role": ...} first, then {"content": ...}, then {} with the finish
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "leanserve"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
