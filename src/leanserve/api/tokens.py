"""Text <-> token ids for the API: prompts, chat templates, and each token's own text."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from transformers.convert_slow_tokenizer import bytes_to_unicode

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
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
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


# GPT-2's byte-level BPE alphabet, character -> byte (every byte is one visible character).
_BYTE_LEVEL = {char: byte for byte, char in bytes_to_unicode().items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoder_types(tokenizer: Any) -> set[str]:
    """The decoder step types of a fast tokenizer's pipeline ("ByteLevel", "ByteFallback", ...)."""
    decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
    if decoder is None:
        return set()
    try:
        spec = json.loads(decoder.__getstate__())
    except Exception:  # a decoder without a serialized form: nothing to learn from it
        return set()
    steps = spec.get("decoders") or [spec]
    return {step.get("type", "") for step in steps if isinstance(step, dict)}


class TokenBytes:
    """A token's own UTF-8 bytes, for chat logprobs' ``bytes``.

    A token may hold part of a character, so its bytes come from the vocabulary, not from its text:
    a byte-level BPE token's string maps back to bytes through the byte alphabet, and a SentencePiece
    byte-fallback token ``<0xC2>`` is that byte (its other tokens are whole characters, "▁" for a
    space). Other tokens (added and special tokens, word-level vocabularies) hold whole characters:
    their bytes are those of the text they add ("" for a special token the output skips).
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        types = _decoder_types(tokenizer)
        self.byte_level = "ByteLevel" in types
        self.byte_fallback = "ByteFallback" in types
        self.added = set(getattr(tokenizer, "added_tokens_decoder", {}) or {})

    def __call__(self, token_id: int, text: str) -> bytes:
        """``text`` is what the token adds in its context (used where the vocabulary says nothing)."""
        raw = self._from_vocabulary(token_id) if token_id not in self.added else None
        return text.encode("utf-8") if raw is None else raw

    def _from_vocabulary(self, token_id: int) -> bytes | None:
        if not (self.byte_level or self.byte_fallback):
            return None
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        if not isinstance(token, str):
            return None
        if self.byte_level:
            if not all(c in _BYTE_LEVEL for c in token):
                return None
            return bytes(_BYTE_LEVEL[c] for c in token)
        single = _BYTE_FALLBACK.fullmatch(token)
        if single:
            return bytes([int(single.group(1), 16)])
        return token.replace("\u2581", " ").encode("utf-8")  # SentencePiece writes a space as "▁"
