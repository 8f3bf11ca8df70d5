"""Logprobs over a byte-level BPE tokenizer (the embedded SmolLM2's), where one character can span
two tokens: " ¿" is [32, 194] + [191]. The tokens must join to the text, their offsets must index
into it, chat's bytes must be each token's own, and a stop string cuts the logprobs where it cuts
the text. First the API's logprobs fed as the engine feeds them (its own detokenizer makes the
text), then the same over HTTP with the real model."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from transformers import AutoTokenizer

from leanserve.api.logprobs import CompletionLogprobsBuilder, OutputPieces, chat_logprobs
from leanserve.api.protocol import ChatTokenLogprob, CompletionLogprobs
from leanserve.api.tokens import TokenBytes
from leanserve.engine.async_engine import AsyncEngine
from leanserve.engine.detokenizer import IncrementalDetokenizer
from leanserve.engine.llm_engine import LLMEngine, TokenLogprob
from leanserve.settings import ServerSettings
from tests.api.api_harness import ServerThread, engine_config, free_port

PROMPT = "Say:"
TEXT = " ¿cómo estás? Héllo 你好 🙂 done"
SPLIT = " ¿cómo"  # its tokens: "ĠÂ" "¿" "c" "Ã³" "mo"
SPLIT_BYTES = [[32, 194], [191], [99], [195, 179], [109, 111]]
SPLIT_TOKENS = ["", " ¿", "c", "ó", "mo"]  # what each adds to the text


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: Path) -> Any:
    return AutoTokenizer.from_pretrained(embedded_model_dir)


def engine_outputs(
    tokenizer: Any, text: str, stop: list[str] | None = None, include_stop: bool = False,
    alternatives: list[tuple[int, float]] | None = None,
) -> Iterator[tuple[list[TokenLogprob], str, bool]]:
    """What the engine hands out per generated token of ``text``: its logprobs, the text delta from
    the engine's own detokenizer (stop strings held back and cut), and whether it finished."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids(tokenizer), stop=stop or [],
                                   include_stop_str_in_output=include_stop)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for i, token in enumerate(ids):
        finished = detok.add_token(token) is not None or i == len(ids) - 1
        entry = TokenLogprob(token, -0.5 - i, [(token, -0.5 - i), *(alternatives or [])])
        yield [entry], detok.take_delta(finished), finished
        if finished:
            return


def prompt_ids(tokenizer: Any) -> list[int]:
    return tokenizer(PROMPT)["input_ids"]


def completion(tokenizer: Any, text: str, **kw: Any) -> tuple[str, CompletionLogprobs, list[CompletionLogprobs]]:
    """The text and logprobs streamed (the chunks, each checked on arrival) and joined."""
    builder = CompletionLogprobsBuilder(tokenizer, prompt_ids(tokenizer), skip_special_tokens=True)
    shown, chunks = "", []
    for entries, delta, finished in engine_outputs(tokenizer, text, **kw):
        shown += delta
        builder.add(entries, delta, finished)
        chunks.append(builder.take())
        # Never a token whose text has not gone out (a stop string may still claim it).
        assert shown.startswith("".join(t for c in chunks for t in c.tokens))
    joined = CompletionLogprobs()
    for c in chunks:
        for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(joined, name).extend(getattr(c, name))
    return shown, joined, chunks


def chat(tokenizer: Any, text: str, **kw: Any) -> tuple[str, list[ChatTokenLogprob]]:
    output = OutputPieces(tokenizer, prompt_ids(tokenizer), skip_special_tokens=True)
    token_bytes = TokenBytes(tokenizer)
    shown, content = "", []
    for entries, delta, finished in engine_outputs(tokenizer, text, **kw):
        shown += delta
        content += chat_logprobs(output.add(entries, delta, finished), token_bytes, top_k=5)
    return shown, content


def assert_consistent(text: str, lp: Any, start: int = 0) -> None:
    """``tokens`` join to the text and each offset is where its token's text sits in it."""
    assert "".join(lp.tokens) == text[start:]
    assert len(lp.tokens) == len(lp.text_offset) == len(lp.token_logprobs) == len(lp.top_logprobs)
    offset = start
    for token, at in zip(lp.tokens, lp.text_offset, strict=True):
        assert at == offset and text[at : at + len(token)] == token
        offset += len(token)


def test_completion_tokens_join_to_text_across_split_characters(tokenizer: Any) -> None:
    text, lp, _ = completion(tokenizer, TEXT)
    assert text == TEXT
    assert_consistent(text, lp)
    assert lp.tokens[: len(SPLIT_TOKENS)] == SPLIT_TOKENS
    assert not any("\ufffd" in t for t in lp.tokens)
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert top[token] == logprob  # the chosen token is found under its own text


def test_echo_offsets_start_after_the_prompt(tokenizer: Any) -> None:
    ids = prompt_ids(tokenizer)
    builder = CompletionLogprobsBuilder(tokenizer, ids, True, text_start=len(PROMPT))
    builder.add_prompt(ids, [None] + [TokenLogprob(t, -1.0, [(t, -1.0)]) for t in ids[1:]])
    for entries, delta, finished in engine_outputs(tokenizer, TEXT):
        builder.add(entries, delta, finished)
    assert_consistent(PROMPT + TEXT, builder.take())


def test_chat_bytes_are_each_tokens_own(tokenizer: Any) -> None:
    text, content = chat(tokenizer, TEXT)
    assert [e.token for e in content[: len(SPLIT_TOKENS)]] == SPLIT_TOKENS
    assert [e.bytes for e in content[: len(SPLIT_BYTES)]] == SPLIT_BYTES
    assert "".join(e.token for e in content) == text
    assert b"".join(bytes(e.bytes) for e in content) == text.encode()
    for e in content:  # the chosen token among its alternatives reads the same
        assert (e.top_logprobs[0].token, e.top_logprobs[0].bytes) == (e.token, e.bytes)


def test_an_alternative_alone_keeps_its_exact_bytes(tokenizer: Any) -> None:
    # Byte 0xA1, the second half of "¡" ([194, 161]): no character on its own.
    second_half = tokenizer.convert_tokens_to_ids("¡")
    _, content = chat(tokenizer, TEXT, alternatives=[(second_half, -9.0)])
    alone = content[0].top_logprobs[1]  # the text before it ends on a whole character
    assert (alone.token, alone.bytes) == ("\ufffd", [161])
    completing = content[1].top_logprobs[1]  # after " ¿"'s [32, 194] it would make " ¡"
    assert (completing.token, completing.bytes) == (" ¡", [161])


@pytest.mark.parametrize(
    ("stop", "include", "kept", "last"),
    [
        (["o est"], False, " ¿cóm", "m"),  # the cut falls inside "mo": its kept part stays
        (["mo est"], False, " ¿có", "ó"),  # at a token boundary: "mo" goes whole
        (["¿c"], False, " ", " "),  # inside the split " ¿": [32, 194] keeps only the space's byte
        (["ómo"], True, " ¿cómo", "mo"),
        (["om"], True, " ¿cómo estás? Héllo 你好 🙂 done", " done"),  # never found: nothing cut
    ],
)
def test_stop_string_cuts_logprobs_where_it_cuts_text(
    tokenizer: Any, stop: list[str], include: bool, kept: str, last: str
) -> None:
    text, lp, _ = completion(tokenizer, TEXT, stop=stop, include_stop=include)
    assert text == kept
    assert_consistent(text, lp)
    assert lp.tokens[-1] == last
    chat_text, content = chat(tokenizer, TEXT, stop=stop, include_stop=include)
    assert chat_text == kept and "".join(e.token for e in content) == kept
    assert b"".join(bytes(e.bytes) for e in content) == kept.encode()


# ---- over HTTP, with the embedded model --------------------------------------------------------

TRANSLATE = "Translate to Japanese: Good morning, how are you?"  # greedy: ... "Hoy, ¿cómo estás?" ...


@pytest.fixture(scope="module")
def smol(embedded_model_dir: Path) -> Iterator[ServerThread]:
    config = engine_config(embedded_model_dir, max_model_len=256, kv_cache_memory=32 << 20)
    settings = ServerSettings(model=str(embedded_model_dir), port=free_port(), log_level="warning",
                              served_model_name="smol")
    server = ServerThread(settings, AsyncEngine(LLMEngine(config))).start()
    yield server
    server.stop()


def post(server: ServerThread, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def stream(server: ServerThread, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with httpx.stream("POST", server.url + path, json={**body, "stream": True}, timeout=120) as r:
        return [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]


def test_completions_over_http(smol: ServerThread) -> None:
    body = {"prompt": TRANSLATE, "max_tokens": 40, "temperature": 0, "logprobs": 0}
    choice = post(smol, "/v1/completions", body)["choices"][0]
    text, lp = choice["text"], CompletionLogprobs(**choice["logprobs"])
    assert "¿" in text  # the split character this test is about
    assert_consistent(text, lp)
    assert "" in lp.tokens and not any("\ufffd" in t for t in lp.tokens)
    chunks = [c["choices"][0] for c in stream(smol, "/v1/completions", body)]
    assert "".join(c["text"] for c in chunks) == text
    assert [t for c in chunks for t in c["logprobs"]["tokens"]] == lp.tokens
    assert [o for c in chunks for o in c["logprobs"]["text_offset"]] == lp.text_offset

    cut = {**body, "stop": "o est"}  # starts inside the token "mo"
    choice = post(smol, "/v1/completions", cut)["choices"][0]
    kept = text_before(text, "o est")
    assert choice["text"] == kept
    assert_consistent(kept, CompletionLogprobs(**choice["logprobs"]))
    streamed = [c["choices"][0] for c in stream(smol, "/v1/completions", cut)]
    assert "".join(t for c in streamed for t in c["logprobs"]["tokens"]) == kept


def text_before(text: str, stop: str) -> str:
    assert stop in text
    return text[: text.index(stop)]


def test_chat_over_http(smol: ServerThread) -> None:
    body = {"messages": [{"role": "user", "content": "Translate to Spanish: Good morning, how are you?"}],
            "max_tokens": 40, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    choice = post(smol, "/v1/chat/completions", body)["choices"][0]
    text, content = choice["message"]["content"], choice["logprobs"]["content"]
    assert "¿" in text
    assert "".join(e["token"] for e in content) == text
    assert b"".join(bytes(e["bytes"]) for e in content) == text.encode()
    assert [191] in [e["bytes"] for e in content]  # the second half of "¿", alone
    streamed = [e for c in stream(smol, "/v1/chat/completions", body) for ch in c["choices"]
                if ch.get("logprobs") for e in ch["logprobs"]["content"]]
    assert streamed == content

    cut = {**body, "stop": "o est"}
    choice = post(smol, "/v1/chat/completions", cut)["choices"][0]
    kept = text_before(text, "o est")
    assert choice["message"]["content"] == kept
    assert "".join(e["token"] for e in choice["logprobs"]["content"]) == kept
    assert b"".join(bytes(e["bytes"]) for e in choice["logprobs"]["content"]) == kept.encode()
