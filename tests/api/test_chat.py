"""/v1/chat/completions through the openai client, plus models, tokenize and the info endpoints."""

from __future__ import annotations

from typing import Any

import httpx
import openai
import pytest

from tests.api.api_harness import MAX_MODEL_LEN, ServerThread

MESSAGES: list[Any] = [
    {"role": "system", "content": "t40 t41"},
    {"role": "user", "content": "t50 t51 t52"},
]


def chat(client: openai.OpenAI, **kw: Any) -> Any:
    kw.setdefault("messages", MESSAGES)
    kw.setdefault("max_tokens", 6)
    kw.setdefault("temperature", 0)
    extra = {"ignore_eos": True, **kw.pop("extra_body", {})}
    return client.chat.completions.create(model="tiny", extra_body=extra, **kw)


def test_basic_chat(client: openai.OpenAI, server: ServerThread) -> None:
    r = chat(client, user="u1", seed=1)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == "tiny"
    c = r.choices[0]
    assert c.index == 0 and c.message.role == "assistant" and c.finish_reason == "length"
    assert len(c.message.content.split()) == 6 and c.logprobs is None
    # The prompt is the chat template's rendering, as /tokenize shows it.
    tokens = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()
    assert r.usage.prompt_tokens == tokens["count"] and r.usage.completion_tokens == 6


def test_chat_equals_completion_of_rendered_prompt(client: openai.OpenAI, server: ServerThread) -> None:
    ids = httpx.post(f"{server.url}/tokenize", json={"messages": MESSAGES}).json()["tokens"]
    ref = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert chat(client).choices[0].message.content == ref.choices[0].text


def test_max_completion_tokens_and_default(client: openai.OpenAI) -> None:
    assert chat(client, max_tokens=None, max_completion_tokens=3).usage.completion_tokens == 3
    # Without a limit, a reply may use the rest of the context.
    r = chat(client, max_tokens=None)
    assert r.usage.prompt_tokens + r.usage.completion_tokens == MAX_MODEL_LEN
    assert r.choices[0].finish_reason == "length"


def test_streaming_chat(client: openai.OpenAI) -> None:
    ref = chat(client, n=2, seed=5, temperature=0.9)
    chunks = list(chat(client, n=2, seed=5, temperature=0.9, stream=True, stream_options={"include_usage": True}))
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    first = {}
    content = {0: "", 1: ""}
    finish = {}
    for ch in chunks[:-1]:
        for c in ch.choices:
            first.setdefault(c.index, c.delta)
            assert c.index not in finish  # nothing after the finish chunk
            content[c.index] += c.delta.content or ""
            if c.finish_reason:
                finish[c.index] = c.finish_reason
    assert all(d.role == "assistant" for d in first.values())  # the role comes first
    assert [content[0], content[1]] == [c.message.content for c in ref.choices]
    assert finish == {0: "length", 1: "length"}
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_chat_logprobs(client: openai.OpenAI) -> None:
    r = chat(client, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    assert "".join(e.token for e in content) == r.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 3 and e.bytes == list(e.token.encode())
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob)  # greedy: chosen = most likely
    plain = chat(client, logprobs=True).choices[0].logprobs.content
    assert [e.token for e in plain] == [e.token for e in content] and plain[0].top_logprobs == []
    streamed = [e for ch in chat(client, logprobs=True, top_logprobs=2, stream=True)
                for c in ch.choices if c.logprobs for e in c.logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]
    with pytest.raises(openai.BadRequestError):
        chat(client, top_logprobs=2)  # needs logprobs=true


def test_chat_logprobs_stop_at_the_stop_string(client: openai.OpenAI) -> None:
    full = chat(client, logprobs=True).choices[0]
    tokens = [e.token for e in full.logprobs.content]
    stop = tokens[2][2:] + tokens[3]  # starts inside the third token
    kept = full.message.content[: full.message.content.index(stop)]
    for stream in (False, True):
        if stream:
            chunks = [c for ch in chat(client, logprobs=True, stop=stop, stream=True) for c in ch.choices]
            content = "".join(c.delta.content or "" for c in chunks)
            entries = [e for c in chunks if c.logprobs for e in c.logprobs.content]
        else:
            r = chat(client, logprobs=True, stop=stop).choices[0]
            content, entries = r.message.content, r.logprobs.content
        assert content == kept and "".join(e.token for e in entries) == kept
        assert entries[-1].token == tokens[2][:2]  # the cut token keeps its part before the stop
        assert b"".join(bytes(e.bytes) for e in entries) == kept.encode()


def test_chat_content_parts_and_roles(client: openai.OpenAI) -> None:
    parts = [{"role": "developer", "content": "t40 t41"},
             {"role": "user", "content": [{"type": "text", "text": "t50 t51"}, {"type": "text", "text": " t52"}]}]
    assert chat(client, messages=parts).choices[0].message.content == chat(client).choices[0].message.content
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    assert "messages[0].content[0]" in (err.value.param or "")


def test_chat_unsupported_features_are_400(client: openai.OpenAI) -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, tools=[tool])
    assert err.value.param == "tools"
    with pytest.raises(openai.BadRequestError):
        chat(client, response_format={"type": "json_object"})
    assert chat(client, response_format={"type": "text"}).choices[0].finish_reason == "length"


def test_chat_sampling_parameters(client: openai.OpenAI) -> None:
    a = chat(client, temperature=1.0, seed=11, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
             logit_bias={"60": 5}, stop=["t999"], extra_body={"top_k": 20, "min_p": 0.01, "priority": 1})
    b = chat(client, temperature=1.0, seed=11, top_p=0.9, presence_penalty=0.5, frequency_penalty=0.5,
             logit_bias={"60": 5}, stop=["t999"], extra_body={"top_k": 20, "min_p": 0.01, "priority": 1})
    assert a.choices[0].message.content == b.choices[0].message.content


def test_models_and_info(client: openai.OpenAI, server: ServerThread) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    # The folder name is accepted as well as the served name.
    folder = server.engine.engine.model_dir.name
    r = client.completions.create(model=folder, prompt="t10", max_tokens=1)
    assert r.model == "tiny"
    assert httpx.get(f"{server.url}/version").json()["version"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_tokenize_detokenize(server: ServerThread) -> None:
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "t10 t11 t12"}).json()
    assert r == {"count": 3, "max_model_len": MAX_MODEL_LEN, "tokens": [10, 11, 12]}
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "t10", "add_special_tokens": False}).json()
    assert r["tokens"] == [10]
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [10, 11]}).json() == {"prompt": "t10 t11"}
    for bad in ({}, {"prompt": "t1", "messages": MESSAGES}, {"prompt": 5}):
        r = httpx.post(f"{server.url}/tokenize", json=bad)
        assert r.status_code == 400 and "error" in r.json()
    assert httpx.post(f"{server.url}/detokenize", json={"tokens": [10**6]}).status_code == 400
