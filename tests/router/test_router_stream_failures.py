"""A replica that fails after a stream's 200 went out: the client must be told, never handed a short
answer that looks complete (docs/api.md: an error event in OpenAI's shape, then `data: [DONE]`)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import openai
import pytest

from leanserve.router.sse import EventWatch
from tests.router.router_fakes import FakeReplica, free_port
from tests.router.test_router_proxy import COMPLETION, config, metric, router_state
from tests.server_thread import wait_for

REPO = Path(__file__).resolve().parents[2]
STREAM = {**COMPLETION, "stream": True}


def data_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("data:")]


def assert_ends_with_upstream_error(lines: list[str]) -> None:
    assert lines[-1] == "data: [DONE]"
    error = json.loads(lines[-2].removeprefix("data: "))["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "upstream_error" and error["code"] == "upstream_failed_mid_stream"
    assert "502" in error["message"]


def test_replica_dying_mid_stream_ends_with_an_error_event_then_done(fleet, router_server):
    (dying,), servers = fleet(FakeReplica("d", chunks=5, die_after=2))
    url = servers[0].url
    router = router_server(config([url], poll_interval_s=30))  # only the stream itself can notice
    with httpx.Client(base_url=router.url, timeout=10) as c:
        r = c.post("/v1/completions", json=STREAM)
        assert r.status_code == 200  # the 200 went out with the first chunk; the body has to say it
        lines = data_lines(r.text)
        assert_ends_with_upstream_error(lines)
        # Before it, the two whole chunks, not the half event the replica sent before dying.
        assert [json.loads(x[6:])["choices"][0]["text"] for x in lines[:-2]] == ["d-0", "d-1"]
        assert metric(c, "leanserve_router_stream_failures_total", replica=url, reason="error") == 1
        assert metric(c, "leanserve_router_stream_failures_total", reason="truncated") == 0
    state = router_state(router).replicas[0]
    assert state.in_flight == 0 and state.consecutive_failures == 1  # passive health saw it


def test_stream_closed_without_done_counts_as_truncated(fleet, router_server):
    (_, _), (cut, ok) = fleet(FakeReplica("t", omit_done=True), FakeReplica("ok"))
    router = router_server(config([cut.url, ok.url]))  # round-robin: the cut one first
    with httpx.Client(base_url=router.url, timeout=10) as c:
        lines = data_lines(c.post("/v1/completions", json=STREAM).text)
        assert len(lines) == 5  # three chunks, the error, [DONE]
        assert_ends_with_upstream_error(lines)
        assert "without [DONE]" in json.loads(lines[-2][6:])["error"]["message"]
        # A complete stream is passed through untouched, and not counted.
        complete = c.post("/v1/completions", json=STREAM)
        assert complete.headers["x-leanserve-replica"] == ok.url
        assert data_lines(complete.text)[-2:] == [
            f'data: {json.dumps({"choices": [{"index": 0, "text": "ok-2"}]})}', "data: [DONE]"]
        assert metric(c, "leanserve_router_stream_failures_total", replica=cut.url, reason="truncated") == 1
        assert metric(c, "leanserve_router_stream_failures_total") == 1


def test_openai_client_raises_when_the_replica_dies_mid_stream(fleet, router_server):
    _, servers = fleet(FakeReplica("d", chunks=4, die_after=1))
    router = router_server(config([servers[0].url]))
    client = openai.OpenAI(base_url=f"{router.url}/v1", api_key="unused", max_retries=0)
    texts = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        for chunk in client.completions.create(model="fake", prompt="hello", max_tokens=4, stream=True):
            texts.append(chunk.choices[0].text)
    assert texts == ["d-0"]


@pytest.fixture
def replica_process():
    """A fake replica in its own process, so the test can SIGKILL it as QA did."""
    port = free_port()
    code = ("import sys, uvicorn; from tests.router.router_fakes import FakeReplica; "
            "uvicorn.run(FakeReplica('k', chunks=500, chunk_delay_s=0.02).app(), host='127.0.0.1', "
            "port=int(sys.argv[1]), log_level='warning')")
    proc = subprocess.Popen([sys.executable, "-c", code, str(port)], cwd=REPO)
    url = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{url}/health", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_for(up, timeout=60)
        yield proc, url
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_sigkilled_replica_mid_stream(replica_process, router_server):
    proc, url = replica_process
    router = router_server(config([url], poll_interval_s=30))
    with httpx.Client(base_url=router.url, timeout=10) as c:
        with c.stream("POST", "/v1/completions", json=STREAM) as resp:
            lines = (line for line in resp.iter_lines() if line)
            received = [next(lines), next(lines)]
            os.kill(proc.pid, signal.SIGKILL)
            received += list(lines)
        assert resp.status_code == 200 and len(received) < 500
        assert_ends_with_upstream_error(received)
        assert metric(c, "leanserve_router_stream_failures_total", replica=url, reason="error") == 1
    wait_for(lambda: router_state(router).replicas[0].in_flight == 0)


def feed_all(watch: EventWatch, *chunks: bytes) -> bytes:
    return b"".join(watch.feed(c) for c in chunks)


def test_event_watch_forwards_whole_events_and_spots_done():
    w = EventWatch()
    assert w.feed(b'data: {"a": 1}\n\ndata: {"b"') == b'data: {"a": 1}\n\n'  # the fragment waits
    assert w.feed(b': 2}\n\n') == b'data: {"b": 2}\n\n' and not w.done
    assert feed_all(w, b"data: [DO", b"NE]\n", b"\n") == b"data: [DONE]\n\n" and w.done
    crlf = EventWatch()
    assert crlf.feed(b"data: x\r\n\r\ndata: [DONE]\r\n\r") == b"data: x\r\n\r\n"
    assert crlf.feed(b"\n") == b"data: [DONE]\r\n\r\n" and crlf.done


def test_event_watch_is_not_fooled_by_done_inside_generated_text():
    w = EventWatch()
    w.feed(b'data: {"text": "data: [DONE]\\n"}\n\n')
    assert not w.done and w.finish() == b"" and not w.done


def test_event_watch_at_a_clean_end():
    cut = EventWatch()
    cut.feed(b'data: {"a": 1}\n\ndata: {"half')
    assert cut.finish() == b"" and not cut.done  # the fragment is dropped, the stream is incomplete
    unterminated = EventWatch()
    unterminated.feed(b'data: {"a": 1}\n\ndata: [DONE]')
    assert unterminated.finish() == b"data: [DONE]" and unterminated.done
    raw = EventWatch(sse=False)
    assert raw.feed(b"{not sse") == b"{not sse" and raw.finish() == b"" and raw.done
