"""Incremental detokenization and stop strings.

Decoding a token alone loses the spaces and merges that depend on its neighbours, so each new token is
decoded together with a few tokens before it and only the text beyond theirs is taken. A token that
ends inside a multi-byte character decodes to U+FFFD and waits for the next one. Stop strings are
matched on the decoded text; while streaming, the last ``len(longest stop) - 1`` characters are held
back so that the beginning of a stop string never reaches the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Tokens of context kept before the new ones, enough for any tokenizer's merges around a boundary.
_CONTEXT_TOKENS = 5


class IncrementalDecoder:
    """Token ids in, the text each adds out, decoded in context (" world", not "world").

    A token is decoded together with the tokens since the last complete character (and a few before
    them, for merges around a boundary) and adds what lies beyond their text. One that ends inside a
    multi-byte character (byte-level BPE splits "¿" into two tokens) adds "", and the character comes
    with the token that completes it. The detokenizer below builds a request's text with it, and the
    API's logprobs read each token's piece with it, so the pieces join to exactly that text.
    """

    def __init__(self, tokenizer: Any, context: list[int] | None = None, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = list((context or [])[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0  # ids[prefix_offset:read_offset] decode to text already handed out
        self.read_offset = len(self.ids)  # ids after it end inside a character, so add nothing yet
        self._prefix: str | None = None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _decoded(self, token_id: int) -> tuple[str, str]:
        """The text before ``token_id`` and the text with it, over the same window of tokens."""
        if self._prefix is None:
            self._prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        return self._prefix, self._decode([*self.ids[self.prefix_offset :], token_id])

    def peek(self, token_id: int) -> str:
        """What ``token_id`` would add here, nothing changed (a top_logprobs alternative). One that ends
        inside a character has no later token to complete it, so its text keeps the U+FFFD."""
        prefix, full = self._decoded(token_id)
        return full[len(prefix) :]

    def add(self, token_id: int) -> str:
        """Append ``token_id``; returns the text it adds ("" while a character is incomplete)."""
        prefix, full = self._decoded(token_id)
        self.ids.append(token_id)
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return ""
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self._prefix = None
        if self.prefix_offset > _CONTEXT_TOKENS:  # keep the window as short as the decode needs
            drop = self.prefix_offset - _CONTEXT_TOKENS
            del self.ids[:drop]
            self.prefix_offset -= drop
            self.read_offset -= drop
        return full[len(prefix) :]


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    prompt_token_ids: list[int]
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    text: str = ""
    emitted: int = 0  # characters of ``text`` already handed out

    def __post_init__(self) -> None:
        self.decoder = IncrementalDecoder(self.tokenizer, self.prompt_token_ids, self.skip_special_tokens)
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one generated token; returns the stop string if the text now contains one.

        With ``check_stop`` False the text grows but is not searched (a request still short of its
        ``min_tokens``): a stop string that ends there is then never matched, while one that starts
        there and ends in a later, checked token still is.
        """
        piece = self.decoder.add(token_id)
        if not piece:
            return None
        before = len(self.text)
        self.text += piece
        if not self.stop or not check_stop:
            return None
        best: tuple[int, str] | None = None
        for s in self.stop:
            # Each string's own window: only a match that ends in the new text. A shared window (the
            # longest string's) would find a short one lying wholly in text added unchecked.
            at = self.text.find(s, max(0, before - len(s) + 1))
            if at != -1 and (best is None or at < best[0]):
                best = (at, s)
        if best is None:
            return None
        at, s = best
        self.text = self.text[: at + len(s)] if self.include_stop_str_in_output else self.text[:at]
        return s

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out; while running, keep back what could still start a stop string."""
        end = len(self.text) if finished or not self._hold else max(self.emitted, len(self.text) - self._hold)
        delta = self.text[self.emitted : end]
        self.emitted = end
        return delta
