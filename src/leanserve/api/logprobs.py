"""Engine ``TokenLogprob``s -> the two OpenAI shapes: completions' parallel lists and chat's objects.

Both list exactly the tokens whose text the client gets, each with the text it adds (the engine's
``IncrementalDecoder``, which also builds the text itself): ``OutputPieces`` follows a choice's text
as the engine hands it out and releases tokens only that far.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from leanserve.api.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob
from leanserve.api.tokens import TokenBytes, finite
from leanserve.engine.detokenizer import IncrementalDecoder
from leanserve.engine.llm_engine import TokenLogprob


@dataclass
class Piece:
    """One token as a response shows it."""

    token_id: int
    text: str  # what the token adds to the choice's text
    offset: int  # where ``text`` starts, in characters
    logprob: float | None  # None for the first prompt token: nothing predicts it
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token id, its text here, logprob)
    cut: str = ""  # the end of the token's text that a stop string took off

    def alternatives(self) -> list[tuple[int, str, float]]:
        # The chosen token among its alternatives reads as it does in the text ("" for a partial
        # character, not U+FFFD), so that clients can look the chosen token up in top_logprobs.
        return [(t, self.text if t == self.token_id else text, lp) for t, text, lp in self.top]


def _next_piece(token_text: IncrementalDecoder, token_id: int, entry: TokenLogprob | None, offset: int) -> Piece:
    """``token_id`` (with its logprobs in ``entry``) as the next piece after ``token_text``'s context."""
    top = [(t, token_text.peek(t), finite(lp)) for t, lp in entry.top] if entry is not None else []
    text = token_text.add(token_id)
    return Piece(token_id, text, offset, None if entry is None else finite(entry.logprob), top)


class OutputPieces:
    """A choice's generated tokens as pieces of its text, released as far as the text has gone.

    The engine reports each token's logprobs as soon as it is sampled, but holds back text that could
    begin a stop string and cuts a stop string off the finished text. Logprobs describe the text the
    client gets, so a token is released once the text handed out covers its piece. Tokens that add ""
    (the first bytes of a split character) go out with the token that completes their character:
    that character may still turn out to begin a stop string, and their bytes are cut with it.

    When the finished text is shorter than the pieces, a stop string cut it. The token in which the
    cut falls keeps the part of its text before the cut (its logprob did score those characters, and
    the pieces must still join to the text); it is dropped when nothing of it is kept, and so is every
    token after it: their text is not in the answer.
    """

    def __init__(self, tokenizer: object, prompt_token_ids: list[int], skip_special_tokens: bool) -> None:
        self.token_text = IncrementalDecoder(tokenizer, prompt_token_ids, skip_special_tokens)
        self.pending: deque[Piece] = deque()
        self.end = 0  # characters in the pieces so far
        self.shown = 0  # characters of text handed out so far

    def add(self, entries: list[TokenLogprob], text_delta: str, finished: bool) -> list[Piece]:
        """One engine output's tokens and text; returns the pieces the text handed out so far covers."""
        for entry in entries:
            piece = _next_piece(self.token_text, entry.token_id, entry, self.end)
            self.pending.append(piece)
            self.end += len(piece.text)
        self.shown += len(text_delta)
        return self._finish() if finished else self._release()

    def _release(self) -> list[Piece]:
        count = 0
        for i, piece in enumerate(self.pending):
            if piece.offset + len(piece.text) > self.shown:
                break
            if piece.text:
                count = i + 1
        return [self.pending.popleft() for _ in range(count)]

    def _finish(self) -> list[Piece]:
        out, self.pending = list(self.pending), deque()
        if self.end <= self.shown:  # nothing was cut
            return out
        kept = []
        for piece in out:
            if piece.offset >= self.shown:
                break
            room = self.shown - piece.offset
            piece.text, piece.cut = piece.text[:room], piece.text[room:]
            kept.append(piece)
        return kept


class CompletionLogprobsBuilder:
    """Accumulates one choice's logprobs; ``take()`` hands out what is new (for stream chunks).

    ``top_logprobs`` holds the k most likely tokens plus the chosen one, as OpenAI documents
    ("up to logprobs+1 elements"). ``tokens`` join to the choice's ``text`` and ``text_offset`` indexes
    into it; with echo the text starts with the prompt, and the output's offsets start at
    ``text_start`` (the prompt text's length).
    """

    def __init__(
        self, tokenizer: object, prompt_token_ids: list[int], skip_special_tokens: bool, text_start: int = 0
    ) -> None:
        self.tokenizer = tokenizer
        self.output = OutputPieces(tokenizer, prompt_token_ids, skip_special_tokens)
        self.text_start = text_start
        self.pending = CompletionLogprobs()

    def _append(self, piece: Piece, start: int) -> None:
        p = self.pending
        p.tokens.append(piece.text)
        p.text_offset.append(start + piece.offset)
        p.token_logprobs.append(piece.logprob)
        if piece.logprob is None:
            p.top_logprobs.append(None)
            return
        top = {text: lp for _, text, lp in piece.alternatives()}
        top.setdefault(piece.text, piece.logprob)
        p.top_logprobs.append(top)

    def add_prompt(self, prompt_token_ids: list[int], prompt_logprobs: list[TokenLogprob | None]) -> None:
        """Echo: the prompt's tokens, decoded as the echoed text is (special tokens kept)."""
        token_text = IncrementalDecoder(self.tokenizer, skip_special_tokens=False)
        offset = 0
        for token_id, entry in zip(prompt_token_ids, prompt_logprobs, strict=False):
            piece = _next_piece(token_text, token_id, entry, offset)
            self._append(piece, 0)
            offset += len(piece.text)

    def add(self, logprobs: list[TokenLogprob], text_delta: str, finished: bool) -> None:
        """An engine output's tokens with the text that came with them (the whole text, unstreamed)."""
        for piece in self.output.add(logprobs, text_delta, finished):
            self._append(piece, self.text_start)

    def take(self) -> CompletionLogprobs:
        out, self.pending = self.pending, CompletionLogprobs()
        return out


def _group_bytes(group: list[Piece], token_bytes: TokenBytes) -> list[bytes]:
    """The own bytes of a character's tokens: those that add "" and the one that completes it.

    Where a stop string cut the group's text, its bytes are kept from the start as far as the kept
    text's bytes go (the cut may fall in an earlier token's bytes: " ¿" is [32, 194] + [191]).
    """
    raws = [token_bytes(p.token_id, p.text + p.cut) for p in group]
    last = group[-1]
    if not last.cut:
        return raws
    budget = len(last.text.encode("utf-8"))
    kept = []
    for raw in raws:
        kept.append(raw[:budget])
        budget -= len(kept[-1])
    return kept


def _chat_entry(piece: Piece, own: bytes, token_bytes: TokenBytes, top_k: int) -> ChatTokenLogprob:
    top = [
        TopLogprob(token=text, logprob=lp, bytes=list(own if t == piece.token_id else token_bytes(t, text)))
        for t, text, lp in piece.alternatives()[:top_k]
    ]
    return ChatTokenLogprob(token=piece.text, logprob=piece.logprob, bytes=list(own), top_logprobs=top)


def chat_logprobs(pieces: list[Piece], token_bytes: TokenBytes, top_k: int) -> list[ChatTokenLogprob]:
    """Chat's shape: each token's text and its own bytes (part of a character, for a split one).

    ``pieces`` are whole groups, as ``OutputPieces`` releases them.
    """
    out: list[ChatTokenLogprob] = []
    group: list[Piece] = []
    for i, piece in enumerate(pieces):
        group.append(piece)
        if piece.text or i == len(pieces) - 1:
            owns = _group_bytes(group, token_bytes)
            out.extend(_chat_entry(p, own, token_bytes, top_k) for p, own in zip(group, owns))
            group = []
    return out
