"""/v1/completions through the official openai client: every parameter, streaming and not."""

from __future__ import annotations

import math
from typing import Any

import openai
import pytest
import torch

from leanserve.engine.llm_engine import LLMEngine
from leanserve.sampling_params import SamplingParams
from tests.api.api_harness import MAX_MODEL_LEN, engine_config

PROMPT = "t10 t11 t12 t13"
PROMPT_IDS = [10, 11, 12, 13]


def greedy(client: openai.OpenAI, prompt: Any, max_tokens: int = 8, **kw: Any) -> Any:
    return client.completions.create(
        model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
        extra_body={"ignore_eos": True, **kw.pop("extra_body", {})}, **kw,
    )


def test_basic_response_shape(client: openai.OpenAI) -> None:
    r = greedy(client, PROMPT, max_tokens=5, user="someone")
    assert r.object == "text_completion" and r.id.startswith("cmpl-") and r.model == "tiny"
    assert len(r.choices) == 1
    c = r.choices[0]
    assert c.index == 0 and c.finish_reason == "length" and c.logprobs is None
    assert len(c.text.split()) == 5
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (4, 5, 9)


def test_greedy_matches_engine_directly(client: openai.OpenAI, tiny_model: Any) -> None:
    """The API adds nothing and loses nothing: same tokens as the engine driven by hand."""
    engine = LLMEngine(engine_config(tiny_model))
    engine.add_request("direct", PROMPT_IDS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    text = ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            text += out.text_delta
    assert greedy(client, PROMPT, max_tokens=12).choices[0].text == text
    assert greedy(client, PROMPT_IDS, max_tokens=12).choices[0].text == text


def test_prompt_forms_and_choice_order(client: openai.OpenAI) -> None:
    a, b = "t20 t21 t22", "t30 t31"
    ref_a = greedy(client, a).choices[0].text
    ref_b = greedy(client, b).choices[0].text
    assert greedy(client, [20, 21, 22]).choices[0].text == ref_a
    for prompt in ([a, b], [[20, 21, 22], [30, 31]]):
        r = greedy(client, prompt, n=2)
        assert [c.index for c in r.choices] == [0, 1, 2, 3]  # prompt-major: p * n + j
        assert [c.text for c in r.choices] == [ref_a, ref_a, ref_b, ref_b]
        assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 4 * 8


def test_echo_loglikelihood_matches_transformers(client: openai.OpenAI, tiny_model: Any) -> None:
    """lm-evaluation-harness's loglikelihood request: echo, max_tokens=0, logprobs=1."""
    from transformers import LlamaForCausalLM

    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    c = r.choices[0]
    assert c.text == PROMPT
    lp = c.logprobs
    assert lp.tokens == ["t10", " t11", " t12", " t13"]  # each token's text in context
    assert "".join(lp.tokens) == c.text
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.text_offset == [0, 3, 7, 11]
    model = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT_IDS])).logits[0].float()
    expected = torch.log_softmax(logits, -1)[torch.arange(3), torch.tensor(PROMPT_IDS[1:])]
    assert lp.token_logprobs[1:] == pytest.approx(expected.tolist(), abs=1e-4)
    for token, top in zip(lp.tokens[1:], lp.top_logprobs[1:], strict=True):
        assert token in top and 1 <= len(top) <= 2  # the top-1 plus the actual token
    assert r.usage.completion_tokens == 0


def test_logprobs_and_echo_with_generation(client: openai.OpenAI) -> None:
    r = greedy(client, PROMPT, max_tokens=4, logprobs=3, echo=True)
    c = r.choices[0]
    assert c.text.startswith(PROMPT)
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    for i in range(4, 8):
        # Greedy: the chosen token is the most likely one.
        assert lp.tokens[i] in lp.top_logprobs[i] and len(lp.top_logprobs[i]) == 3
        assert max(lp.top_logprobs[i].values()) == pytest.approx(lp.token_logprobs[i])
    for token, offset in zip(lp.tokens, lp.text_offset, strict=True):
        assert c.text[offset : offset + len(token)] == token
    assert "".join(lp.tokens) == c.text


def test_stream_matches_non_stream(client: openai.OpenAI) -> None:
    ref = greedy(client, [PROMPT, "t40 t41"], max_tokens=6, logprobs=1)
    chunks = list(greedy(client, [PROMPT, "t40 t41"], max_tokens=6, logprobs=1, stream=True,
                         stream_options={"include_usage": True}))
    texts = {0: "", 1: ""}
    tokens: dict[int, list[str]] = {0: [], 1: []}
    finish = {}
    for ch in chunks[:-1]:
        assert ch.object == "text_completion" and ch.id == chunks[0].id
        for c in ch.choices:
            texts[c.index] += c.text
            tokens[c.index] += c.logprobs.tokens
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert [texts[0], texts[1]] == [c.text for c in ref.choices]
    assert [tokens[0], tokens[1]] == [c.logprobs.tokens for c in ref.choices]
    assert finish == {0: "length", 1: "length"}


def test_stop_strings(client: openai.OpenAI) -> None:
    words = greedy(client, PROMPT).choices[0].text.split()
    r = greedy(client, PROMPT, stop=words[2])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text.split() == words[:2]
    r = greedy(client, PROMPT, stop=["t999", words[1]])
    assert r.choices[0].text.split() == words[:1]
    streamed = "".join(c.choices[0].text for c in greedy(client, PROMPT, stop=[words[2]], stream=True))
    assert streamed.split() == words[:2]  # the stop string never leaks into the stream


def kept_tokens(tokens: list[str], length: int) -> list[str]:
    """The tokens of a text cut to ``length`` characters: the one the cut falls in keeps its part."""
    out, at = [], 0
    for token in tokens:
        if at >= length:
            break
        out.append(token[: length - at])
        at += len(token)
    return out


def test_stop_string_cuts_logprobs(client: openai.OpenAI) -> None:
    full = greedy(client, PROMPT, logprobs=1).choices[0]
    tokens = full.logprobs.tokens
    stop = tokens[2][2:] + tokens[3]  # " t123" " t45" -> "123 t45": starts inside a token
    kept = full.text[: full.text.index(stop)]
    expected = kept_tokens(tokens, len(kept))
    assert expected[-1] == " t"  # the cut token keeps its part before the stop string
    r = greedy(client, PROMPT, logprobs=1, stop=stop).choices[0]
    assert r.text == kept and r.logprobs.tokens == expected
    assert r.logprobs.text_offset == full.logprobs.text_offset[: len(expected)]
    assert r.logprobs.token_logprobs == full.logprobs.token_logprobs[: len(expected)]
    chunks = [c.choices[0] for c in greedy(client, PROMPT, logprobs=1, stop=stop, stream=True)]
    assert "".join(c.text for c in chunks) == kept
    assert [t for c in chunks for t in c.logprobs.tokens] == expected
    # Echoed: the prompt's tokens, then the output's, cut the same way.
    r = greedy(client, PROMPT, logprobs=1, stop=stop, echo=True).choices[0]
    assert r.text == PROMPT + kept and r.logprobs.tokens[len(PROMPT_IDS) :] == expected
    assert r.logprobs.text_offset[-1] == len(PROMPT) + len(kept) - len(expected[-1])


def test_seed_and_n(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.0,
                              extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, n=3, **kw)
    b = client.completions.create(seed=7, n=3, **kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # distinct seeds per choice
    # Choice i samples with seed + i.
    assert client.completions.create(seed=8, **kw).choices[0].text == a.choices[1].text


def test_best_of_picks_highest_cumulative_logprob(client: openai.OpenAI) -> None:
    kw: dict[str, Any] = dict(model="tiny", prompt=PROMPT, max_tokens=6, temperature=1.0,
                              extra_body={"ignore_eos": True})
    r = client.completions.create(seed=3, best_of=3, n=1, **kw)
    assert len(r.choices) == 1 and r.usage.completion_tokens == 18
    candidates = [client.completions.create(seed=3 + i, logprobs=0, **kw).choices[0] for i in range(3)]
    best = max(candidates, key=lambda c: sum(c.logprobs.token_logprobs))
    assert r.choices[0].text == best.text
    with pytest.raises(openai.BadRequestError):
        client.completions.create(best_of=1, n=2, **kw)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(best_of=3, n=1, stream=True, **kw)


def test_logit_bias_forces_token(client: openai.OpenAI) -> None:
    r = greedy(client, PROMPT, max_tokens=4, logit_bias={"50": 100})
    assert r.choices[0].text.split() == ["t50"] * 4


def test_sampling_extensions(client: openai.OpenAI) -> None:
    ref = greedy(client, PROMPT).choices[0].text
    # top_k=1 is greedy whatever the temperature.
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=1.5,
                                  extra_body={"top_k": 1, "ignore_eos": True})
    assert r.choices[0].text == ref
    for extra, kw in [
        ({"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.3}, {"top_p": 0.9}),
        ({"top_k": -1}, {"presence_penalty": 1.5, "frequency_penalty": -1.0}),
        ({"top_k": 100_000, "min_tokens": 2}, {}),  # top_k >= vocab means no limit
        ({"priority": -5, "include_stop_str_in_output": True}, {"stop": "t5"}),
    ]:
        r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0.8, seed=1,
                                      extra_body={"ignore_eos": True, **extra}, **kw)
        assert r.choices[0].finish_reason in ("stop", "length")


def test_stop_token_ids_and_eos(client: openai.OpenAI) -> None:
    first = greedy(client, PROMPT_IDS, max_tokens=3, logprobs=0).choices[0].logprobs.tokens
    first = [t.strip() for t in first]
    stop_id = int(first[1][1:])  # "t123" -> 123
    r = greedy(client, PROMPT_IDS, max_tokens=8, extra_body={"stop_token_ids": [stop_id]})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text.split() == first[:2]
    # The model's eos (id 1, "</s>") ends generation unless ignore_eos.
    r = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, temperature=0,
                                  logit_bias={"1": 100})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1


def test_max_tokens_default_and_clamp(client: openai.OpenAI) -> None:
    r = client.completions.create(model="tiny", prompt=PROMPT, temperature=0, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 16
    long_prompt = list(range(8, 8 + MAX_MODEL_LEN - 5))
    r = client.completions.create(model="tiny", prompt=long_prompt, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "length"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=long_prompt, max_tokens=6)
    assert err.value.code == "context_length_exceeded"
    assert f"maximum context length is {MAX_MODEL_LEN}" in err.value.message
    assert f"requested {MAX_MODEL_LEN + 1} tokens" in err.value.message


def test_suffix_is_a_clear_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="tiny", prompt=PROMPT, suffix="t20", max_tokens=2)
    assert err.value.param == "suffix" and "fill-in-the-middle" in err.value.message


def test_usage_counts_cached_prefix(client: openai.OpenAI) -> None:
    prompt = list(range(100, 140))  # 40 tokens: two full 16-token blocks to reuse
    greedy(client, prompt, max_tokens=1)
    r = greedy(client, prompt, max_tokens=1)
    assert r.usage.prompt_tokens_details.cached_tokens == 32
    assert not math.isnan(r.usage.total_tokens)
