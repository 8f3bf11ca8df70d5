"""Token accounting for a response, as OpenAI bills it.

A prompt counts once however many samples it has (n, best_of); every generated token counts, the
discarded best_of samples' included. ``cached_tokens`` is the prompt prefix served from the KV cache;
for a prompt with several samples it is the smallest of theirs (the first sample computes what the
later ones reuse).
"""

from __future__ import annotations

from leanserve.api.protocol import PromptTokensDetails, Usage
from leanserve.engine.llm_engine import RequestOutput


class UsageCounter:
    def __init__(self) -> None:
        self.prompt_tokens: dict[int, int] = {}
        self.cached_tokens: dict[int, int] = {}
        self.completion_tokens = 0

    def add(self, prompt_index: int, final: RequestOutput) -> None:
        """Count one finished engine request (its last output carries the totals)."""
        self.prompt_tokens[prompt_index] = final.num_prompt_tokens
        cached = self.cached_tokens.get(prompt_index)
        self.cached_tokens[prompt_index] = (
            final.num_cached_tokens if cached is None else min(cached, final.num_cached_tokens)
        )
        self.completion_tokens += final.num_output_tokens

    def usage(self) -> Usage:
        prompt = sum(self.prompt_tokens.values())
        return Usage(
            prompt_tokens=prompt,
            completion_tokens=self.completion_tokens,
            total_tokens=prompt + self.completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=sum(self.cached_tokens.values())),
        )
