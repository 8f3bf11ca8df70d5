"""Engine behaviour beyond greedy equality: stopping, aborting, seeds, validation."""

from __future__ import annotations

from pathlib import Path

import pytest

from leanserve.engine.config import EngineConfig
from leanserve.engine.llm_engine import LLMEngine, RequestError
from leanserve.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama_dir: Path) -> LLMEngine:
    # No batching window: it opens with the arrival rate, so the requests of earlier tests could hold a
    # later test's first step back.
    return LLMEngine(
        EngineConfig(model=str(tiny_llama_dir), kv_cache_memory=1 << 20, max_model_len=256, max_batch_wait_ms=0)
    )


def run(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    outs: dict[str, list] = {rid: [] for rid in requests}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outs[out.request_id].append(out)
    return outs


def test_max_tokens_and_length_finish(engine: LLMEngine) -> None:
    outs = run(engine, {"a": ([5, 6, 7], SamplingParams(max_tokens=9, temperature=0.0, ignore_eos=True))})
    tokens = [t for o in outs["a"] for t in o.new_token_ids]
    assert len(tokens) == 9 and outs["a"][-1].finish_reason == "length" and outs["a"][-1].finished
    assert engine.block_manager.num_used_blocks == 0


def test_stop_token_ids_end_the_request(engine: LLMEngine) -> None:
    free = run(engine, {"f": ([5, 6, 7], SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))})
    tokens = [t for o in free["f"] for t in o.new_token_ids]
    stop_at = tokens[4]
    cut = run(engine, {"s": ([5, 6, 7], SamplingParams(max_tokens=12, temperature=0.0, stop_token_ids=[stop_at]))})
    got = [t for o in cut["s"] for t in o.new_token_ids]
    assert got == tokens[: tokens.index(stop_at) + 1]
    assert cut["s"][-1].finish_reason == "stop" and cut["s"][-1].stop_reason == stop_at


def tokens_of(outs: list) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


NEVER = -1e9  # a logit_bias that keeps a token out, as the min_tokens block should


def test_min_tokens_blocks_every_eos_id(tmp_path: Path) -> None:
    """EOS ids from config.json (a list) and generation_config.json are all held back until min_tokens:
    the tokens before are greedy's next best, and the first one allowed ends the request."""
    import json

    from tests.conftest import build_tiny_checkpoint

    model_dir = build_tiny_checkpoint(tmp_path / "multi-eos", "llama", eos_token_id=[1, 7])
    (model_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 9]}))
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory=1 << 20, max_model_len=256))
    assert engine.eos_token_ids == {1, 7, 9}
    eos_first = {1: 100.0, 7: 100.0, 9: 100.0}  # greedy picks an EOS at every step

    def params(**kw) -> SamplingParams:
        return SamplingParams(**{"max_tokens": 12, "temperature": 0.0, "logit_bias": eos_first, **kw})

    outs = run(engine, {  # in one batch: each row is blocked on its own
        "free": ([5, 6, 7], params()),
        "held": ([5, 6, 7], params(min_tokens=5)),
        "ref": ([5, 6, 7], params(max_tokens=5, logit_bias={1: NEVER, 7: NEVER, 9: NEVER})),
    })
    assert tokens_of(outs["free"]) in ([1], [7], [9]) and outs["free"][-1].finish_reason == "stop"
    held = tokens_of(outs["held"])
    assert held[:5] == tokens_of(outs["ref"]) and len(held) == 6 and held[5] in (1, 7, 9)
    assert outs["held"][-1].finish_reason == "stop" and outs["held"][-1].stop_reason == held[5]


def test_min_tokens_blocks_stop_token_ids(engine: LLMEngine) -> None:
    first = tokens_of(run(engine, {"f": ([5, 6, 7], SamplingParams(max_tokens=1, temperature=0.0))})["f"])[0]
    base = {"temperature": 0.0, "ignore_eos": True}
    outs = run(engine, {
        "held": ([5, 6, 7], SamplingParams(
            max_tokens=12, stop_token_ids=[first], logit_bias={first: 100.0}, min_tokens=4, **base)),
        "ref": ([5, 6, 7], SamplingParams(max_tokens=4, logit_bias={first: NEVER}, **base)),
    })
    held = tokens_of(outs["held"])
    assert held == tokens_of(outs["ref"]) + [first]
    assert outs["held"][-1].finish_reason == "stop" and outs["held"][-1].stop_reason == first


def test_min_tokens_leaves_eos_alone_under_ignore_eos(engine: LLMEngine) -> None:
    """With ignore_eos EOS ends nothing, so min_tokens has nothing to hold back: it stays sampleable."""
    eos = engine.tokenizer.eos_token_id
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True, min_tokens=3, logit_bias={eos: 100.0})
    outs = run(engine, {"i": ([5, 6, 7], params)})
    assert tokens_of(outs["i"]) == [eos] * 5 and outs["i"][-1].finish_reason == "length"


def test_min_tokens_delays_stop_strings(engine: LLMEngine) -> None:
    """Every token is t42 and the stop string is "t42": it ends the request at the min_tokens-th token at
    the earliest (as in vLLM: the output then holds min_tokens tokens, the last one cut as the stop)."""
    def params(min_tokens: int) -> SamplingParams:
        return SamplingParams(max_tokens=10, temperature=0.0, logit_bias={42: 100.0}, stop=["t42"],
                              min_tokens=min_tokens)

    outs = run(engine, {"free": ([5, 6, 7], params(0)), "held": ([5, 6, 7], params(4))})
    assert tokens_of(outs["free"]) == [42] and "".join(o.text_delta for o in outs["free"]).split() == []
    assert tokens_of(outs["held"]) == [42] * 4
    last = outs["held"][-1]
    assert last.finish_reason == "stop" and last.stop_reason == "t42"
    assert "".join(o.text_delta for o in outs["held"]).split() == ["t42"] * 3


def test_seed_reproducible_whatever_the_batch(engine: LLMEngine) -> None:
    params = SamplingParams(max_tokens=10, temperature=1.0, seed=123, ignore_eos=True)
    alone = run(engine, {"x": ([9, 8, 7], params)})
    crowd = run(
        engine,
        {
            "y": ([9, 8, 7], params),
            **{f"n{i}": ([i + 3, 4, 5, 6], SamplingParams(max_tokens=7, temperature=1.0)) for i in range(5)},
        },
    )
    assert [t for o in alone["x"] for t in o.new_token_ids] == [t for o in crowd["y"] for t in o.new_token_ids]


def test_abort_frees_blocks_and_reports(engine: LLMEngine) -> None:
    engine.add_request("z", list(range(3, 60)), SamplingParams(max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.block_manager.num_used_blocks > 0
    out = engine.abort_request("z")
    assert out is not None and out.finished and out.finish_reason == "abort"
    assert engine.block_manager.num_used_blocks == 0 and not engine.has_unfinished_requests()


def test_context_length_is_enforced_with_a_clear_error(engine: LLMEngine) -> None:
    with pytest.raises(RequestError) as info:
        engine.add_request("long", [5] * 250, SamplingParams(max_tokens=10))
    assert info.value.code == "context_length_exceeded"
    assert "256" in str(info.value) and "260" in str(info.value)
    with pytest.raises(RequestError):
        engine.add_request("bad", [5, 10_000], SamplingParams())
    with pytest.raises(RequestError):
        engine.add_request("empty", [], SamplingParams())


def test_echo_scoring_with_zero_max_tokens(engine: LLMEngine) -> None:
    outs = run(engine, {"e": ([5, 6, 7, 8], SamplingParams(max_tokens=0, prompt_logprobs=0))})
    last = outs["e"][-1]
    assert last.finished and last.new_token_ids == [] and last.num_output_tokens == 0
    assert [p.token_id for p in outs["e"][0].prompt_logprobs[1:]] == [6, 7, 8]


def test_sliding_window_model_is_served_up_to_its_window_only(tmp_path: Path) -> None:
    """No sliding-window mask is implemented, so the context is capped at the window: within it the
    outputs are exact (tests/engine/test_correctness.py), past it a request gets a clear 400-class error."""
    from tests.conftest import build_tiny_checkpoint

    model_dir = build_tiny_checkpoint(tmp_path / "mistral-sw", "mistral", sliding_window=48)
    engine = LLMEngine(EngineConfig(model=str(model_dir), kv_cache_memory=1 << 20))
    assert engine.max_model_len == 48
    with pytest.raises(RequestError) as info:
        engine.add_request("long", [5] * 40, SamplingParams(max_tokens=10))
    assert info.value.code == "context_length_exceeded"
    out = run(engine, {"ok": ([5] * 30, SamplingParams(max_tokens=18, temperature=0.0, ignore_eos=True))})
    assert sum(len(o.new_token_ids) for o in out["ok"]) == 18


def test_contiguous_blocks_are_read_as_a_view_with_the_same_tokens(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lone sequence gets consecutive blocks, also once the pool has been used and freed over and over,
    and the CPU decode attention then reads them as a view instead of gathering them: same greedy tokens
    either way (gathering forced for the comparison by finding no consecutive run)."""
    import leanserve.model.runner as runner_module

    tokens: dict[bool, list[list[int]]] = {}
    used: dict[bool, list[bool]] = {True: [], False: []}  # per decode group: read as a view?
    for view in (True, False):
        if not view:
            monkeypatch.setattr(runner_module, "consecutive_run", lambda ids: None)
        engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), kv_cache_memory=1 << 20, max_model_len=256))
        make_groups = engine.runner._decode_groups

        def groups(*args, make_groups=make_groups, seen=used[view]):
            out = make_groups(*args)
            seen.extend(isinstance(g.blocks, slice) for g in out)
            return out

        engine.runner._decode_groups = groups
        rounds = engine.block_manager.num_blocks // 3  # 5-6 blocks a request: the pool cycles ~1.6 times
        tokens[view] = []
        for r in range(rounds):
            prompt = ([3 + (i * (r + 1)) % 50 for i in range(40)],
                      SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True))
            tokens[view].append([t for o in run(engine, {f"r{r}": prompt})[f"r{r}"] for t in o.new_token_ids])
    # 98% here (42 rounds); a sequence whose first block has no free successor still gathers. Taking the
    # least recently freed block instead: 100% in the first cycle, 60% by round 42, 43% by round 64.
    assert used[True] and sum(used[True]) >= 0.9 * len(used[True])
    assert used[False] and not any(used[False])  # the comparison run did gather
    assert tokens[True] == tokens[False] and all(len(t) == 40 for t in tokens[True])


def test_prompt_logprobs_survive_a_preemption_mid_prefill(tiny_llama_dir: Path) -> None:
    """A recompute after preemption restarts the prefill in chunks that need not meet where the first
    pass stopped; every prompt token still gets its logprob, equal to an unpreempted run's."""
    # fp32: bf16 matmuls block by chunk shape, so chunks of 17 and 24 rows would differ in the 3rd digit.
    engine = LLMEngine(EngineConfig(model=str(tiny_llama_dir), kv_cache_memory=1 << 20, max_model_len=256,
                                    max_batch_wait_ms=0, max_num_batched_tokens=24, cpu_matmul_dtype="float32"))
    prompt = [(7 * i) % 250 + 3 for i in range(100)]
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1)

    def prompt_logprobs(preempt_after: int | None) -> list:
        engine.add_request("p", prompt, params)
        seq, steps, got = engine.seqs["p"], 0, None
        while engine.has_unfinished_requests():
            if steps == preempt_after:
                assert 0 < seq.num_computed_tokens < len(prompt) - 1  # mid-prefill
                engine.scheduler._preempt(seq)  # as when blocks run out
                engine.scheduler._preempted_this_step.clear()
                # Recompute in chunks that straddle where the first pass stopped.
                engine.scheduler.config.max_num_batched_tokens = 17
            for out in engine.step():
                got = out.prompt_logprobs if out.prompt_logprobs is not None else got
            steps += 1
        engine.scheduler.config.max_num_batched_tokens = 24
        return got

    alone = prompt_logprobs(None)
    preempted = prompt_logprobs(2)  # after 48 of 100 tokens
    assert len(alone) == len(prompt) and len(preempted) == len(prompt)
    assert preempted[0] is None and [e.token_id for e in preempted[1:]] == prompt[1:]
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(alone[1:], preempted[1:], strict=True))
