"""Property: no generated body, however wrong, gets a 5xx; every error is in OpenAI's shape.

Bodies are plausible (most get past validation, so the engine sees the edge cases: extreme
penalties, huge top_k, odd stops, seeds at the int64 limits) and half the time one field is
replaced by arbitrary JSON. Bounded: 200 examples in all.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.api_harness import ServerThread

SETTINGS = dict(deadline=None, database=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
anything = st.recursive(
    scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
    max_leaves=6,
)


words = st.lists(st.integers(0, 310).map(lambda i: f"t{i}"), min_size=1, max_size=12).map(" ".join)
ids = st.lists(st.integers(-1, 300), min_size=1, max_size=12)
# What a mutation puts in place of one field: arbitrary JSON, or a number at or past some limit.
breakers = anything | st.sampled_from([-1, 0, 21, 129, 2**63, -(2**63) - 1, -1.0, 1e-30, 1e30, 2.5,
                                       float("nan"), float("inf"), "", [], {}])
COMMON = {
    "model": st.just("tiny"),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(1e-6, 1),
    "n": st.integers(1, 3),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "stop": st.one_of(st.text(max_size=3), st.lists(words | st.text(max_size=3), max_size=3)),
    "presence_penalty": st.floats(-2, 2),
    "frequency_penalty": st.floats(-2, 2),
    "logit_bias": st.dictionaries(st.integers(0, 299).map(str), st.floats(-100, 100), max_size=3),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "user": st.text(max_size=5),
    "top_k": st.integers(-1, 400),
    "min_p": st.floats(0, 1),
    "repetition_penalty": st.floats(1e-3, 100),
    "ignore_eos": st.booleans(),
    "stop_token_ids": ids,
    "min_tokens": st.integers(0, 8),
    "priority": st.integers(-(2**63), 2**63 - 1),
    "include_stop_str_in_output": st.booleans(),
}


def bodies(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """A valid-looking body; half the time one field (known or not) is broken."""
    keys = sorted([*required, *optional, "unknown_field"])

    @st.composite
    def build(draw: st.DrawFn) -> dict[str, Any]:
        body = draw(st.fixed_dictionaries(required, optional=optional))
        if draw(st.booleans()):
            body[draw(st.sampled_from(keys))] = draw(breakers)
        return body

    return build()


COMPLETION = bodies(
    {"prompt": st.one_of(words, st.lists(words, max_size=3), ids, st.lists(ids, max_size=3))},
    {**COMMON, "max_tokens": st.integers(0, 20), "best_of": st.integers(1, 4), "logprobs": st.integers(0, 20),
     "echo": st.booleans()},
)
content = st.one_of(words, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": words}), max_size=2))
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "user", "assistant", "developer"])},
    optional={"content": content, "name": st.text(max_size=3)},
)
CHAT = bodies(
    {"messages": st.lists(message, min_size=1, max_size=3), "max_tokens": st.integers(1, 20)},
    {**COMMON, "max_completion_tokens": st.integers(1, 20), "logprobs": st.booleans(),
     "top_logprobs": st.integers(0, 20), "response_format": st.just({"type": "text"})},
)


def check(r: httpx.Response) -> None:
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        return
    if r.headers["content-type"].startswith("text/event-stream"):
        events = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        for e in events[:-1]:
            assert "error" not in json.loads(e), e
    else:
        assert r.json()["choices"]


@pytest.fixture(scope="module")
def fuzz_server(start_server: Callable[..., ServerThread]) -> ServerThread:
    # A short context keeps every generation short, whatever max_tokens the fuzzer picks.
    return start_server(engine_overrides={"max_model_len": 48})


@pytest.fixture(scope="module")
def http(fuzz_server: ServerThread) -> httpx.Client:
    with httpx.Client(base_url=fuzz_server.url, timeout=60) as c:
        yield c


def send(http: httpx.Client, path: str, body: Any) -> httpx.Response:
    # json.dumps writes NaN/Infinity (invalid JSON that Python parsers accept): fine, fuzz it too.
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


@settings(max_examples=100, **SETTINGS)
@given(body=COMPLETION)
def test_completions_never_5xx(http: httpx.Client, body: dict[str, Any]) -> None:
    check(send(http, "/v1/completions", body))


@settings(max_examples=80, **SETTINGS)
@given(body=CHAT)
def test_chat_never_5xx(http: httpx.Client, body: dict[str, Any]) -> None:
    check(send(http, "/v1/chat/completions", body))


@settings(max_examples=20, **SETTINGS)
@given(path=st.sampled_from(["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"]),
       raw=st.one_of(st.binary(max_size=40), anything.map(lambda v: json.dumps(v).encode())))
def test_raw_bodies_never_5xx(http: httpx.Client, path: str, raw: bytes) -> None:
    r = http.post(path, content=raw, headers={"content-type": "application/json"})
    assert r.status_code < 500 and "error" in r.json()
