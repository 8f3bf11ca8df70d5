"""Engine ``TokenLogprob``s -> the two OpenAI shapes: completions' parallel lists and chat's objects."""

from __future__ import annotations

from leanserve.api.protocol import ChatTokenLogprob, CompletionLogprobs, TopLogprob
from leanserve.api.tokens import TokenText, finite
from leanserve.engine.llm_engine import TokenLogprob


class CompletionLogprobsBuilder:
    """Accumulates one choice's logprobs; ``take()`` hands out what is new (for stream chunks).

    ``top_logprobs`` holds the k most likely tokens plus the chosen one, as OpenAI documents
    ("up to logprobs+1 elements"); ``text_offset`` indexes into the choice's ``text`` (which, with
    echo, starts with the prompt).
    """

    def __init__(self, tokenizer: object, context: list[int]) -> None:
        self.token_text = TokenText(tokenizer, context)
        self.offset = 0
        self.pending = CompletionLogprobs()

    def _append(self, token_id: int, entry: TokenLogprob | None) -> None:
        tt = self.token_text
        text = tt.piece(token_id)
        p = self.pending
        p.tokens.append(text)
        p.text_offset.append(self.offset)
        self.offset += len(text)
        if entry is None:  # the first prompt token: nothing predicts it
            p.token_logprobs.append(None)
            p.top_logprobs.append(None)
        else:
            p.token_logprobs.append(finite(entry.logprob))
            top = {tt.piece(t): finite(lp) for t, lp in entry.top}
            top.setdefault(text, finite(entry.logprob))
            p.top_logprobs.append(top)
        tt.advance(token_id)

    def add_prompt(self, prompt_token_ids: list[int], prompt_logprobs: list[TokenLogprob | None]) -> None:
        for token_id, entry in zip(prompt_token_ids, prompt_logprobs, strict=False):
            self._append(token_id, entry)

    def add(self, logprobs: list[TokenLogprob]) -> None:
        for entry in logprobs:
            self._append(entry.token_id, entry)

    def take(self) -> CompletionLogprobs:
        out, self.pending = self.pending, CompletionLogprobs()
        return out


def chat_logprobs(entries: list[TokenLogprob], token_text: TokenText, top_k: int) -> list[ChatTokenLogprob]:
    """Chat's shape; ``token_text`` is this choice's own (it tracks the context as tokens arrive)."""
    out = []
    for e in entries:
        text = token_text.piece(e.token_id)
        top = []
        for t, lp in e.top[:top_k]:
            alt = token_text.piece(t)
            top.append(TopLogprob(token=alt, logprob=finite(lp), bytes=list(alt.encode("utf-8"))))
        out.append(ChatTokenLogprob(token=text, logprob=finite(e.logprob), bytes=list(text.encode("utf-8")),
                                    top_logprobs=top))
        token_text.advance(e.token_id)
    return out
