from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from leanserve.engine.detokenizer import IncrementalDetokenizer

TEXT = "Héllo, wörld! 你好世界 🙂🚀 The quick brown fox — jumps over 12,345 lazy dogs.\n  Indented line."


@pytest.fixture(scope="module")
def tokenizer(embedded_model_dir: Path):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


def stream(tokenizer, text: str, prompt: str = "Say:", **kwargs) -> tuple[IncrementalDetokenizer, str, str | None]:
    prompt_ids = tokenizer(prompt)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, **kwargs)
    streamed, hit = "", None
    for token in tokenizer(text, add_special_tokens=False)["input_ids"]:
        hit = detok.add_token(token)
        streamed += detok.take_delta(finished=hit is not None)
        if hit is not None:
            break
    streamed += detok.take_delta(finished=True)
    return detok, streamed, hit


def test_incremental_text_equals_full_decode(tokenizer) -> None:
    detok, streamed, _ = stream(tokenizer, TEXT)
    full = tokenizer.decode(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    assert detok.text == full and streamed == full


def test_stop_string_is_cut_and_never_streamed(tokenizer) -> None:
    detok, streamed, hit = stream(tokenizer, TEXT, stop=["brown fox"])
    assert hit == "brown fox"
    assert streamed == detok.text
    assert streamed.endswith("The quick ") and "brown" not in streamed


def test_earliest_stop_wins_and_can_be_included(tokenizer) -> None:
    detok, streamed, hit = stream(tokenizer, TEXT, stop=["lazy", "wörld"], include_stop_str_in_output=True)
    assert hit == "wörld" and streamed == "Héllo, wörld"


def test_streaming_holds_back_a_possible_stop_prefix(tokenizer) -> None:
    prompt_ids = tokenizer("x")["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=["STOP"])
    seen = ""
    for token in tokenizer(" abc ST", add_special_tokens=False)["input_ids"]:
        assert detok.add_token(token) is None
        seen += detok.take_delta(finished=False)
    assert "ST" not in seen  # might still become STOP
    assert detok.take_delta(finished=True).endswith("ST")


def test_unchecked_tokens_grow_the_text_but_never_match_a_stop(tokenizer) -> None:
    """What min_tokens asks of stop strings: one that ends in an unchecked token is never matched later;
    one that starts there and ends in a checked token is."""
    ids = tokenizer(" the cat sat on the mat", add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer("x")["input_ids"]
    cat_ends = next(i for i in range(len(ids)) if tokenizer.decode(ids[: i + 1]).endswith("cat"))
    for stop, want in (("cat", None), ("cat sat", "cat sat")):
        detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=[stop])
        hit, at = None, None
        for at, token in enumerate(ids):
            hit = detok.add_token(token, check_stop=at > cat_ends)
            if hit is not None:
                break
        assert hit == want
        if want:
            assert at == cat_ends + 1
            assert detok.text == " the "  # cut where the stop string began, in unchecked text


def test_a_short_stop_in_unchecked_text_is_not_found_beside_a_long_one(tokenizer) -> None:
    """Each stop string is looked for only where it could end in the new text: a longer one in the list
    must not widen the window over text added unchecked (min_tokens)."""
    ids = tokenizer(" one. two. three. four", add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer("x")["input_ids"]
    first_dot = next(i for i in range(len(ids)) if tokenizer.decode(ids[: i + 1]).endswith("."))
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, stop=[".", "a very long stop string"])
    hit, at = None, None
    for at, token in enumerate(ids):
        hit = detok.add_token(token, check_stop=at > first_dot)
        if hit is not None:
            break
    # Not at " two" (the "." behind it was added unchecked) but at the next ".", after "two".
    assert hit == "." and at > first_dot + 1 and detok.text == " one. two"
