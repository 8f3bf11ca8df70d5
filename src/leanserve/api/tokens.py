"""Text <-> token ids for the API: prompts, chat templates, and each token's own text."""

from __future__ import annotations

import asyncio
from typing import Any

from leanserve.api.errors import APIError, bad_request
from leanserve.api.protocol import ChatMessage

# Longer texts are tokenized off the event loop so /health keeps answering in milliseconds.
_INLINE_CHARS = 20_000

# Reported in place of -inf (JSON has no infinities), as vLLM does.
_MIN_LOGPROB = -9999.0


def finite(logprob: float) -> float:
    return logprob if logprob == logprob and logprob > _MIN_LOGPROB else _MIN_LOGPROB


def _ids(encoding: Any) -> list[int]:
    ids = encoding["input_ids"] if isinstance(encoding, dict) or hasattr(encoding, "keys") else encoding
    return list(ids)


async def encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    if len(text) <= _INLINE_CHARS:
        return _ids(tokenizer(text, add_special_tokens=add_special_tokens))
    encoding = await asyncio.to_thread(tokenizer, text, add_special_tokens=add_special_tokens)
    return _ids(encoding)


def chat_messages(messages: list[ChatMessage]) -> list[dict[str, str]]:
    """OpenAI messages -> what chat templates expect: role and plain-string content."""
    out = []
    for i, m in enumerate(messages):
        content = m.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad_request(
                        f"content part type {part.type!r} is not supported (this model reads text only)",
                        param=f"messages[{i}].content[{j}].type",
                    )
                texts.append(part.text)
            content = "".join(texts)
        message = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name is not None:
            message["name"] = m.name
        out.append(message)
    return out


def render_chat(tokenizer: Any, messages: list[ChatMessage], add_generation_prompt: bool = True) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template; use /v1/completions", param="messages")
    try:
        text = tokenizer.apply_chat_template(
            chat_messages(messages), add_generation_prompt=add_generation_prompt, tokenize=False
        )
    except APIError:
        raise
    except Exception as exc:  # the template's own checks (role order, ...) raise jinja errors
        raise bad_request(f"the chat template rejected these messages: {exc}", param="messages") from exc
    if not isinstance(text, str):
        raise bad_request("the chat template did not render to text", param="messages")
    return text


class TokenText:
    """Each token's text as it reads in context (" world", not "world"), for logprobs.

    A token decoded alone loses what depends on its neighbours (SentencePiece's leading space, a
    word-level tokenizer's separators), so a token's text is what it adds to the decoded text of the
    few tokens before it. The pieces then concatenate to the text, and ``text_offset`` adds up.
    """

    _CONTEXT = 5

    def __init__(self, tokenizer: Any, context: list[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.reset(context or [])

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def reset(self, context: list[int]) -> None:
        self.context = list(context[-self._CONTEXT :])
        self._prefix = None

    def piece(self, token_id: int) -> str:
        """The text ``token_id`` would add after the current context (the context is unchanged)."""
        if not self.context:
            return self._decode([token_id])
        if self._prefix is None:
            self._prefix = self._decode(self.context)
        full = self._decode([*self.context, token_id])
        if full.startswith(self._prefix):
            return full[len(self._prefix) :]
        return self._decode([token_id])

    def advance(self, token_id: int) -> None:
        self.context = [*self.context, token_id][-self._CONTEXT :]
        self._prefix = None
