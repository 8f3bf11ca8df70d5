from __future__ import annotations

import torch

from leanserve.model.sampler import Sampler, SampleRequest
from leanserve.sampling_params import SamplingParams

VOCAB = 50


def row(
    prompt: list[int] | None = None, output: list[int] | None = None, blocked: tuple[int, ...] = (), **params
) -> SampleRequest:
    prompt = prompt or [1, 2]
    return SampleRequest(SamplingParams(**params), prompt + (output or []), len(prompt), blocked)


def logits_from_probs(probs: list[float]) -> torch.Tensor:
    full = torch.full((VOCAB,), 1e-9)
    full[: len(probs)] = torch.tensor(probs)
    return full.log().unsqueeze(0)


def test_greedy_is_argmax_and_reports_raw_logprobs() -> None:
    logits = torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(0))
    out = Sampler()(logits, [row(temperature=0.0, logprobs=4) for _ in range(3)])
    assert out.token_ids == logits.argmax(-1).tolist()
    ref = torch.log_softmax(logits, -1)
    for i in range(3):
        assert abs(out.logprobs[i] - float(ref[i, out.token_ids[i]])) < 1e-6
        assert [t for t, _ in out.top_logprobs[i]] == ref[i].topk(4).indices.tolist()


def test_seeded_sampling_is_independent_of_batch_composition() -> None:
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(4, VOCAB, generator=gen)
    alone = Sampler()(logits[1:2], [row(temperature=1.0, seed=42)]).token_ids[0]
    rows = [row(temperature=1.0), row(temperature=1.0, seed=42), row(temperature=0.7), row(temperature=0.0)]
    batched = Sampler()(logits, rows).token_ids[1]
    assert alone == batched
    # The draw depends on the output index, so successive tokens are not all the same draw.
    draws = {
        Sampler()(logits[1:2], [row(temperature=1.0, seed=42, output=[5] * k)]).token_ids[0] for k in range(20)
    }
    assert len(draws) > 1


def test_top_k_top_p_min_p_restrict_support() -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = logits_from_probs(probs).repeat(400, 1)
    sampler = Sampler()
    top_k = set(sampler(logits, [row(top_k=2)] * 400).token_ids)
    assert top_k == {0, 1}
    top_p = set(sampler(logits, [row(top_p=0.6)] * 400).token_ids)
    assert top_p == {0, 1}  # 0.5 alone does not reach 0.6; 0.5 + 0.3 does
    min_p = set(sampler(logits, [row(min_p=0.5)] * 400).token_ids)
    assert min_p == {0, 1}  # 0.15 < 0.5 * 0.5
    unrestricted = set(sampler(logits, [row()] * 400).token_ids)
    assert {0, 1, 2} <= unrestricted


def test_temperature_sharpens() -> None:
    logits = logits_from_probs([0.4, 0.35, 0.25]).repeat(500, 1)
    # At T=0.02 token 0 outweighs token 1 by exp(log(0.4/0.35)/0.02) ~ 800x.
    cold = Sampler()(logits, [row(temperature=0.02)] * 500).token_ids
    assert cold.count(0) > 490
    warm = Sampler()(logits, [row(temperature=1.0)] * 500).token_ids
    assert warm.count(0) < 260


def test_logit_bias_and_penalties() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 3] = 2.0
    assert Sampler()(logits, [row(temperature=0.0, logit_bias={7: 5.0})]).token_ids == [7]
    # Presence and frequency penalties only look at generated tokens.
    # Frequency: 2.0 - 2 * 0.6 = 0.8 keeps token 3 on top; 2.0 - 2 * 1.1 = -0.2 drops it.
    assert Sampler()(logits, [row(temperature=0.0, output=[3, 3], frequency_penalty=0.6)]).token_ids == [3]
    assert Sampler()(logits, [row(temperature=0.0, output=[3, 3], frequency_penalty=1.1)]).token_ids != [3]
    logits2 = torch.zeros(1, VOCAB)
    logits2[0, 3], logits2[0, 4] = 2.0, 1.5
    assert Sampler()(logits2, [row(temperature=0.0, output=[3], presence_penalty=1.0)]).token_ids == [4]
    assert Sampler()(logits2, [row(temperature=0.0, output=[3], presence_penalty=0.2)]).token_ids == [3]


def test_repetition_penalty_matches_transformers() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(3))
    history = [1, 4, 9, 9, 20]
    request = row(prompt=history[:2], output=history[2:], repetition_penalty=1.3)
    ours = Sampler._apply_penalties_and_bias(logits, [request])
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([history]), logits.clone())
    assert torch.allclose(ours, theirs)


def test_blocked_tokens_are_never_picked_but_keep_their_raw_logprobs() -> None:
    """One batched -inf write: each row loses only its own ids, greedy falls to the next best, sampled
    rows never draw them, a bias cannot lift them back, and logprobs stay the raw ones (like logit_bias)."""
    logits = logits_from_probs([0.6, 0.3, 0.1]).repeat(3, 1)
    rows = [
        row(temperature=0.0, logprobs=2, blocked=(0, 10_000, -1)),  # out-of-vocab ids ignored
        row(temperature=0.0, logprobs=2),
        row(temperature=0.0, logit_bias={1: 50.0}, blocked=(0, 1)),
    ]
    out = Sampler()(logits, rows)
    assert out.token_ids == [1, 0, 2]
    raw = torch.log_softmax(logits[0], -1)
    assert abs(out.logprobs[0] - float(raw[1])) < 1e-6
    assert [t for t, _ in out.top_logprobs[0]] == [0, 1]  # the blocked id still shows as an alternative
    sampled = set(Sampler()(logits.repeat(100, 1), [row(blocked=(0,))] * 300).token_ids)
    assert sampled == {1, 2}


def test_blocking_leaves_the_callers_logits_alone() -> None:
    logits = logits_from_probs([0.6, 0.4])
    before = logits.clone()
    assert Sampler()(logits, [row(temperature=0.0, blocked=(0,))]).token_ids == [1]
    assert torch.equal(logits, before)
