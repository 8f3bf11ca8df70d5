"""Turn a batch of next-token logits into tokens, each row under its own request's parameters.

Order of operations (per row): logit_bias, repetition / presence / frequency penalties, blocked tokens
(-inf), temperature, top-k, top-p, min-p, then sample. Greedy rows take the argmax of the processed
logits. Reported logprobs are those of the model's own distribution (raw logits), which is what
evaluation harnesses and the quality metric want: neither a bias nor a blocked token changes them.
A seeded row draws from a generator keyed on (seed, output index), so its tokens do not depend on
what else shares the batch, nor on preemption and recomputation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from leanserve.sampling_params import SamplingParams

_SEED_STRIDE = 1_000_003


@dataclass
class SampleRequest:
    """One row of the batch: the parameters and the token history the penalties look at.

    ``token_ids`` is the sequence's own list (prompt + output), shared, not copied: slicing it every
    step for every row would cost O(length) in the hot loop when most rows use no penalty.
    """

    params: SamplingParams
    token_ids: list[int]
    num_prompt_tokens: int
    # Ids this row must not pick this step: the engine fills it with the request's stop tokens while
    # the output is shorter than ``min_tokens``, so that EOS cannot end it early.
    blocked_token_ids: tuple[int, ...] = ()

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # of each chosen token
    top_logprobs: list[list[tuple[int, float]] | None]  # per row, when the row asked for them


def compute_top_logprobs(
    logprobs: torch.Tensor, k: int
) -> tuple[list[list[int]], list[list[float]]]:
    values, indices = torch.topk(logprobs, k, dim=-1)
    return indices.tolist(), values.tolist()


class Sampler:
    def __call__(self, logits: torch.Tensor, rows: list[SampleRequest]) -> SamplerOutput:
        logits = logits.float()
        raw_logprobs = torch.log_softmax(logits, dim=-1)
        edited = self._apply_penalties_and_bias(logits, rows)
        processed = self._block_tokens(edited, rows, owned=edited is not logits)
        greedy = [r.params.greedy for r in rows]
        if all(greedy):
            tokens = processed.argmax(dim=-1)
        else:
            tokens = self._sample(processed, rows, greedy)
        chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
        top: list[list[tuple[int, float]] | None] = [None] * len(rows)
        wanted = [r.params.logprobs for r in rows]
        k_max = max((k for k in wanted if k), default=0)
        if k_max:
            ids, values = compute_top_logprobs(raw_logprobs, k_max)
            for i, k in enumerate(wanted):
                if k:
                    top[i] = list(zip(ids[i][:k], values[i][:k], strict=False))
        return SamplerOutput(tokens.tolist(), chosen.tolist(), top)

    @staticmethod
    def _apply_penalties_and_bias(logits: torch.Tensor, rows: list[SampleRequest]) -> torch.Tensor:
        if not any(r.params.logit_bias or r.params.needs_penalties for r in rows):
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i, row in enumerate(rows):
            p = row.params
            if p.logit_bias:
                ids = torch.tensor([t for t in p.logit_bias if 0 <= t < vocab], dtype=torch.long)
                bias = torch.tensor([p.logit_bias[t] for t in ids.tolist()], dtype=logits.dtype)
                logits[i].index_add_(0, ids.to(logits.device), bias.to(logits.device))
            if not p.needs_penalties:
                continue
            if p.repetition_penalty != 1.0:
                seen = torch.tensor(
                    sorted(set(row.token_ids)),  # prompt and output alike
                    dtype=torch.long, device=logits.device,
                )
                if seen.numel():
                    vals = logits[i, seen]
                    logits[i, seen] = torch.where(
                        vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty
                    )
            if (p.presence_penalty or p.frequency_penalty) and row.num_output_tokens:
                counts = torch.bincount(
                    torch.tensor(row.output_token_ids, dtype=torch.long), minlength=vocab
                ).to(logits.device, logits.dtype)
                logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(
                    logits.dtype
                )
        return logits

    @staticmethod
    def _block_tokens(logits: torch.Tensor, rows: list[SampleRequest], owned: bool) -> torch.Tensor:
        """Every row's blocked ids at -inf, in one indexed write for the whole batch. Last of the logit
        edits, so that no bias can lift a blocked token back."""
        if not any(r.blocked_token_ids for r in rows):
            return logits
        vocab = logits.shape[1]
        # An id outside the vocabulary (a stop_token_ids entry is not range-checked) is never sampled.
        pairs = [(i, t) for i, r in enumerate(rows) for t in r.blocked_token_ids if 0 <= t < vocab]
        if not pairs:
            return logits
        index = torch.tensor(pairs, dtype=torch.long, device=logits.device).T
        minus_inf = torch.tensor(float("-inf"), device=logits.device)
        if owned:  # a bias or penalty already copied the logits: edit that copy
            return logits.index_put_((index[0], index[1]), minus_inf)
        # Out of place: ``logits`` is the caller's tensor.
        return logits.index_put((index[0], index[1]), minus_inf)

    @staticmethod
    def _sample(
        logits: torch.Tensor, rows: list[SampleRequest], greedy: list[bool]
    ) -> torch.Tensor:
        device = logits.device
        temps = torch.tensor(
            [1.0 if g else r.params.temperature for r, g in zip(rows, greedy, strict=False)],
            dtype=logits.dtype, device=device,
        )
        scaled = logits / temps.unsqueeze(1)
        top_ks = [r.params.top_k for r in rows]
        if any(k > 0 for k in top_ks):
            vocab = logits.shape[1]
            # top_k >= vocab keeps every token (and torch.topk would fail on k > vocab).
            ks = torch.tensor([k if 0 < k < vocab else vocab for k in top_ks], device=device)
            k_max = int(ks.max())
            kth = torch.topk(scaled, k_max, dim=-1).values.gather(1, (ks - 1).unsqueeze(1))
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        top_ps = [r.params.top_p for r in rows]
        if any(p < 1.0 for p in top_ps):
            sorted_logits, order = scaled.sort(dim=-1, descending=True)
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            ps = torch.tensor(top_ps, dtype=logits.dtype, device=device).unsqueeze(1)
            # Drop a token when the tokens strictly more likely already reach top_p.
            drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= ps
            drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
            scaled = scaled.masked_fill(drop, float("-inf"))
        probs = scaled.softmax(dim=-1)
        min_ps = [r.params.min_p for r in rows]
        if any(m > 0 for m in min_ps):
            threshold = torch.tensor(min_ps, dtype=probs.dtype, device=device).unsqueeze(1)
            probs = probs.masked_fill(probs < threshold * probs.max(dim=-1, keepdim=True).values, 0.0)
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p without a cumulative sum.
        noise = torch.empty_like(probs).exponential_()
        for i, row in enumerate(rows):
            if row.params.seed is not None and not greedy[i]:
                gen = torch.Generator(device=device)
                gen.manual_seed((row.params.seed * _SEED_STRIDE + row.num_output_tokens) % (1 << 63))
                noise[i] = torch.empty(probs.shape[1], device=device).exponential_(generator=gen)
        sampled = (probs / noise).argmax(dim=-1)
        if any(greedy):
            mask = torch.tensor(greedy, device=device)
            sampled = torch.where(mask, logits.argmax(dim=-1), sampled)
        return sampled
