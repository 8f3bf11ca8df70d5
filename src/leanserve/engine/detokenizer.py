"""Incremental detokenization and stop strings.

Decoding a token alone loses the spaces and merges that depend on its neighbours, so each new token is
decoded together with a few tokens before it and only the text beyond theirs is taken. A token that
ends inside a multi-byte character decodes to U+FFFD and waits for the next one. Stop strings are
matched on the decoded text; while streaming, the last ``len(longest stop) - 1`` characters are held
back so that the beginning of a stop string never reaches the client.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# Tokens of context kept before the new ones, enough for any tokenizer's merges around a boundary.
_CONTEXT_TOKENS = 5


@dataclass
class IncrementalDetokenizer:
    tokenizer: object
    prompt_token_ids: list[int]
    stop: list[str] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    text: str = ""
    emitted: int = 0  # characters of ``text`` already handed out
    prefix_offset: int = 0
    read_offset: int = 0
    token_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.token_ids)
        self._hold = max((len(s) for s in self.stop), default=1) - 1

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one generated token; returns the stop string if the text now contains one.

        With ``check_stop`` False the text grows but is not searched (a request still short of its
        ``min_tokens``): a stop string that ends there is then never matched, while one that starts
        there and ends in a later, checked token still is.
        """
        self.token_ids.append(token_id)
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return None
        before = len(self.text)
        self.text += full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        # Bound the growth of the decode window to the context it needs.
        if self.prefix_offset > _CONTEXT_TOKENS:
            drop = self.prefix_offset - _CONTEXT_TOKENS
            del self.token_ids[:drop]
            self.prefix_offset -= drop
            self.read_offset -= drop
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
