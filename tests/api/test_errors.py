"""Status codes and error bodies, with raw httpx: bad input is a 4xx in OpenAI's shape, never a 500."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

import leanserve.api.server as server_module
from tests.api.api_harness import MAX_MODEL_LEN, ServerThread, wait_for


def assert_error(r: httpx.Response, status: int, param: str | None = "-", code: str | None = "-") -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if param != "-":
        assert body["error"]["param"] == param
    if code != "-":
        assert body["error"]["code"] == code
    return body["error"]


def post(server: ServerThread, path: str, body: Any, **kw: Any) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(server.url + path, content=body, headers={"content-type": "application/json"}, **kw)
    return httpx.post(server.url + path, json=body, **kw)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{", None),
        (b"", None),
        (b"[1, 2]", None),
        (b'{"prompt": "t10", "temperature": NaN}', "temperature"),
        ({"max_tokens": 3}, "prompt"),
        ({"prompt": "t10", "temperature": "hot"}, "temperature"),
        ({"prompt": "t10", "temperature": 3}, "temperature"),
        ({"prompt": "t10", "top_p": 0}, "top_p"),
        ({"prompt": "t10", "n": 0}, "n"),
        ({"prompt": "t10", "n": 1.5}, "n"),
        ({"prompt": "t10", "n": True}, "n"),
        ({"prompt": "t10", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "t10", "max_tokens": "5"}, "max_tokens"),
        ({"prompt": "t10", "logprobs": 21}, "logprobs"),
        ({"prompt": "t10", "stop": 5}, "stop"),
        ({"prompt": "t10", "logit_bias": {"abc": 1}}, "logit_bias"),
        ({"prompt": "t10", "logit_bias": {"100000": 1}}, "logit_bias"),
        ({"prompt": "t10", "logit_bias": {"5": 101}}, "logit_bias.5"),
        ({"prompt": "t10", "seed": 2**70}, "seed"),
        ({"prompt": "t10", "top_k": -2}, "top_k"),
        ({"prompt": "t10", "repetition_penalty": 0}, "repetition_penalty"),
        ({"prompt": "t10", "stream_options": {"include_usage": "yes"}}, "stream_options.include_usage"),
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [-1]}, "prompt"),
        ({"prompt": [300]}, "prompt"),
        ({"prompt": [[10], "t10"]}, "prompt"),
        ({"prompt": {"text": "t10"}}, "prompt"),
        ({"prompt": "t10", "best_of": 1, "n": 2}, "best_of"),
    ],
)
def test_completions_bad_input_is_400(server: ServerThread, body: Any, param: str | None) -> None:
    assert_error(post(server, "/v1/completions", body), 400, param=param)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "t10"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ({"messages": "t10"}, "messages"),
        ({"messages": [{"role": "user", "content": "t10"}], "max_tokens": 0}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "t10"}], "top_logprobs": 30, "logprobs": True}, "top_logprobs"),
        ({"messages": [{"role": "user", "content": "t10"}], "logprobs": 1}, "logprobs"),
    ],
)
def test_chat_bad_input_is_400(server: ServerThread, body: Any, param: str | None) -> None:
    assert_error(post(server, "/v1/chat/completions", body), 400, param=param)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        # Raw JSON: the escape "\ud800" parses to a lone surrogate.
        ("/v1/completions", r'{"prompt": "\ud800", "max_tokens": 2}', "prompt"),
        ("/v1/completions", r'{"prompt": ["t10", "t11 \udc00"], "max_tokens": 2}', "prompt[1]"),
        ("/v1/completions", r'{"prompt": "t10", "stop": "\ud800"}', "stop"),
        ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": "t10\ud800"}]}',
         "messages[0].content"),
        ("/v1/chat/completions", r'{"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]}',
         "messages[0].content[0].text"),
        ("/tokenize", r'{"prompt": "\ud800"}', "prompt"),
        ("/tokenize", r'{"messages": [{"role": "user", "content": "\udfff"}]}', "messages[0].content"),
    ],
)
def test_lone_surrogate_is_400(server: ServerThread, path: str, body: str, param: str) -> None:
    e = assert_error(post(server, path, body), 400, param=param, code="invalid_value")
    assert e["type"] == "invalid_request_error"
    assert f"'{param}'" in e["message"] and "valid Unicode" in e["message"] and "lone surrogate" in e["message"]


def test_surrogate_pair_is_one_character(server: ServerThread) -> None:
    r = post(server, "/tokenize", r'{"prompt": "t10 \ud83d\ude00"}')  # U+1F600, escaped as JSON writes it
    assert r.status_code == 200 and r.json()["count"] == 2


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool"])
def test_chat_message_needs_content(server: ServerThread, role: str) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "t10"}, {"role": role}]
    assert_error(post(server, "/v1/chat/completions", {"messages": messages}), 400, param="messages[1].content",
                 code="missing_required_parameter")
    messages[1]["content"] = None
    assert_error(post(server, "/v1/chat/completions", {"messages": messages}), 400, param="messages[1].content")
    messages[1]["content"] = ""  # empty content is content
    assert post(server, "/v1/chat/completions", {"messages": messages, "max_tokens": 1}).status_code == 200


def test_context_length_exceeded(server: ServerThread) -> None:
    prompt = list(range(8, 8 + 100))
    e = assert_error(post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 50}), 400,
                     code="context_length_exceeded")
    assert f"maximum context length is {MAX_MODEL_LEN} tokens" in e["message"] and "requested 150" in e["message"]
    # Streaming is refused the same way, before any 200 goes out.
    body = {"prompt": prompt, "max_tokens": 50, "stream": True}
    assert_error(post(server, "/v1/completions", body), 400, code="context_length_exceeded")
    body = {"messages": [{"role": "user", "content": "t10 " * 200}], "stream": True}
    assert_error(post(server, "/v1/chat/completions", body), 400, code="context_length_exceeded")


def test_unknown_model_route_and_method(server: ServerThread) -> None:
    assert_error(post(server, "/v1/completions", {"prompt": "t10", "model": "gpt-4"}), 404, param="model",
                 code="model_not_found")
    assert_error(post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "t1"}],
                                                      "model": "gpt-4"}), 404, code="model_not_found")
    assert_error(httpx.get(server.url + "/v1/nothing"), 404)
    assert_error(httpx.get(server.url + "/v1/completions"), 405)


def test_api_key(start_server: Callable[..., ServerThread]) -> None:
    s = start_server(api_key="sekret")
    body = {"prompt": "t10", "max_tokens": 1}
    assert_error(post(s, "/v1/completions", body), 401, code="invalid_api_key")
    assert_error(post(s, "/v1/completions", body, headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(httpx.get(s.url + "/v1/models", headers={"Authorization": "sekret"}), 401)
    assert post(s, "/v1/completions", body, headers={"Authorization": "Bearer sekret"}).status_code == 200
    assert httpx.get(s.url + "/health").status_code == 200  # probes need no key
    assert httpx.get(s.url + "/metrics").status_code == 200
    import openai

    client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        client.models.list()


def test_body_limit(start_server: Callable[..., ServerThread]) -> None:
    s = start_server(max_request_body_bytes=2000)
    big = {"prompt": "t10 " * 1000, "max_tokens": 1}
    assert_error(post(s, "/v1/completions", big), 413, code="request_too_large")

    def chunked() -> Any:  # no Content-Length: the limit applies while the body streams in
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 500):
            yield payload[i : i + 500]

    r = httpx.post(s.url + "/v1/completions", content=chunked(), headers={"content-type": "application/json"})
    assert_error(r, 413)
    assert post(s, "/v1/completions", {"prompt": "t10 t11", "max_tokens": 1}).status_code == 200


def _slow_steps(server: ServerThread, seconds: float) -> None:
    """Slow the engine down (a listener runs on the engine thread after every step)."""
    server.engine.step_listeners.append(lambda *_: time.sleep(seconds))


def test_queue_full_is_429_with_retry_after(start_server: Callable[..., ServerThread]) -> None:
    s = start_server(max_queued_requests=3)
    _slow_steps(s, 0.01)
    body = {"prompt": "t10", "max_tokens": 60, "ignore_eos": True, "n": 2}
    results: list[int] = []
    t = threading.Thread(target=lambda: results.append(post(s, "/v1/completions", body, timeout=60).status_code))
    t.start()
    wait_for(lambda: s.engine.num_unfinished == 2)
    r = post(s, "/v1/completions", body)
    e = assert_error(r, 429, code="rate_limit_exceeded")
    assert int(r.headers["Retry-After"]) >= 1 and "capacity" in e["message"]
    assert post(s, "/v1/completions", {"prompt": "t10", "max_tokens": 1}).status_code == 200  # 2 + 1 <= 3
    assert_error(post(s, "/v1/completions", {"prompt": "t10", "n": 4}), 400, param="n")  # could never fit
    t.join()
    assert results == [200]


def test_loading_then_ready_then_dead(start_server: Callable[..., ServerThread],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    gate = threading.Event()
    real = server_module.build_engine

    def slow_build(settings: Any) -> Any:
        gate.wait(30)
        return real(settings)

    monkeypatch.setattr(server_module, "build_engine", slow_build)
    engine = {"max_model_len": 64, "kv_cache_memory": 1 << 22, "num_threads": 1}
    s = start_server(inject=False, wait_ready=False, engine=engine)
    r = httpx.get(s.url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "loading"
    assert_error(post(s, "/v1/completions", {"prompt": "t10"}), 503, code="model_loading")
    gate.set()
    wait_for(lambda: httpx.get(s.url + "/health").status_code == 200, timeout=30)
    assert post(s, "/v1/completions", {"prompt": "t10", "max_tokens": 2}).status_code == 200
    s.engine.error = RuntimeError("simulated crash")  # what the loop records when it dies
    r = httpx.get(s.url + "/health")
    assert r.status_code == 503 and r.json()["status"] == "dead"
    assert_error(post(s, "/v1/completions", {"prompt": "t10"}), 503, code="engine_dead")


def test_failed_load_stops_the_server(start_server: Callable[..., ServerThread],
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(settings: Any) -> Any:
        time.sleep(0.3)
        raise OSError("no such checkpoint")

    monkeypatch.setattr(server_module, "build_engine", broken)
    s = start_server(inject=False, wait_ready=False)
    s.thread.join(timeout=30)
    assert not s.thread.is_alive() and s.state.status == "failed"
    assert "no such checkpoint" in (s.state.load_error or "")


def test_failed_load_logs_one_error_line_and_the_trace_at_debug(start_server: Callable[..., ServerThread],
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """The operator gets the model and the reason on one ERROR line; the stack is for --log-level debug."""
    def broken(settings: Any) -> Any:
        raise ValueError("unsupported GGUF tensor 'rope_freqs.weight'")

    monkeypatch.setattr(server_module, "build_engine", broken)
    caplog.set_level(logging.DEBUG, logger=server_module.logger.name)
    s = start_server(inject=False, wait_ready=False)
    s.thread.join(timeout=30)
    assert not s.thread.is_alive() and s.state.status == "failed"
    records = [r for r in caplog.records if r.name == server_module.logger.name]
    errors = [r for r in records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info is None
    message = errors[0].getMessage()
    assert s.state.settings.model in message and "rope_freqs.weight" in message and "\n" not in message
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in records)
