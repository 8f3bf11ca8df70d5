from __future__ import annotations

from leanserve.engine.block_manager import BlockManager
from leanserve.engine.scheduler import Scheduler, SchedulerConfig
from leanserve.engine.sequence import Sequence, SequenceStatus
from leanserve.sampling_params import SamplingParams


def make(num_blocks: int = 64, block_size: int = 4, **config) -> Scheduler:
    return Scheduler(SchedulerConfig(**config), BlockManager(num_blocks, block_size, False))


def seq(rid: str, n: int, priority: int = 0, arrival: float = 0.0) -> Sequence:
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(), priority=priority, arrival_time=arrival)


def finish_step(sched: Scheduler, batch) -> None:
    """Pretend the model ran: advance computed tokens and append one token to sampled sequences."""
    for s, n in zip(batch.seqs, batch.num_new_tokens):
        s.num_computed_tokens += n
        if s.num_computed_tokens == len(s.token_ids):
            s.token_ids.append(7)


def test_requests_join_running_batch_at_any_step() -> None:
    sched = make()
    a = seq("a", 5)
    sched.add(a)
    b1 = sched.schedule()
    assert b1.seqs == [a] and b1.num_new_tokens == [5]
    finish_step(sched, b1)
    b = seq("b", 3, arrival=1.0)
    sched.add(b)
    b2 = sched.schedule()
    assert b2.seqs == [a, b] and b2.num_new_tokens == [1, 3]


def test_token_budget_chunks_long_prompts_and_decodes_go_first() -> None:
    sched = make(max_num_batched_tokens=8)
    a = seq("a", 2)
    sched.add(a)
    finish_step(sched, sched.schedule())
    long = seq("long", 20, arrival=1.0)
    sched.add(long)
    chunks = []
    for _ in range(3):
        batch = sched.schedule()
        assert batch.num_tokens <= 8
        assert batch.seqs[0] is a and batch.num_new_tokens[0] == 1  # a's decode is never stalled
        chunks.append(dict(zip([s.request_id for s in batch.seqs], batch.num_new_tokens))["long"])
        finish_step(sched, batch)
    assert chunks == [7, 7, 6]


def test_max_num_seqs_caps_the_batch() -> None:
    sched = make(max_num_seqs=2)
    for i in range(3):
        sched.add(seq(f"s{i}", 2, arrival=i))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["s0", "s1"]
    assert len(sched.waiting) == 1


def test_preemption_picks_lowest_priority_latest_arrival_and_requeues_at_head() -> None:
    # 4 blocks of 2 tokens; three sequences of 2 tokens each fill three blocks.
    sched = make(num_blocks=4, block_size=2, watermark_blocks=0)
    seqs = [seq("old", 2, arrival=0), seq("urgent", 2, priority=-1, arrival=5), seq("new", 2, arrival=9)]
    for s in seqs:
        sched.add(s)
    finish_step(sched, sched.schedule())  # each now has 3 tokens: needs a second block
    batch = sched.schedule()
    victim = seqs[2]
    assert batch.preempted == [victim]
    assert victim.status is SequenceStatus.WAITING and victim.block_table == []
    assert victim.num_computed_tokens == 0 and len(victim.token_ids) == 3  # output kept for recompute
    assert sched.waiting[0] is victim
    assert {s.request_id for s in batch.seqs} == {"old", "urgent"}
    assert sched.num_preemptions == 1


def test_priority_orders_admission() -> None:
    sched = make(max_num_seqs=1)
    sched.add(seq("late-but-urgent", 2, priority=-5, arrival=10))
    sched.add(seq("early", 2, priority=0, arrival=0))
    assert sched.schedule().seqs[0].request_id == "late-but-urgent"


def test_finished_sequence_leaves_and_frees_blocks_immediately() -> None:
    sched = make()
    a = seq("a", 6)
    sched.add(a)
    finish_step(sched, sched.schedule())
    used = sched.block_manager.num_used_blocks
    assert used == 2
    sched.remove(a)
    assert sched.block_manager.num_used_blocks == 0 and not sched.has_work


def test_without_chunking_long_prompt_runs_alone() -> None:
    sched = make(max_num_batched_tokens=4, enable_chunked_prefill=False)
    sched.add(seq("long", 10))
    sched.add(seq("short", 2, arrival=1))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["long"] and batch.num_new_tokens == [10]


def test_decodes_go_first_even_behind_an_earlier_long_prefill() -> None:
    sched = make(max_num_batched_tokens=8)
    long, short = seq("long", 40, arrival=0.0), seq("short", 2, arrival=1.0)
    sched.add(long)
    sched.add(short)
    finish_step(sched, sched.schedule())  # long's first chunk; short waits for budget
    for _ in range(3):
        batch = sched.schedule()
        new = dict(zip([s.request_id for s in batch.seqs], batch.num_new_tokens))
        assert batch.num_tokens <= 8
        if short.num_computed_tokens:  # once short is past its prompt, it decodes every step
            assert new["short"] == 1
        finish_step(sched, batch)
    assert short.num_computed_tokens >= 3 and long.num_uncomputed_tokens > 0


def test_a_new_prompt_starts_beside_a_long_prefill_not_after_it() -> None:
    sched = make(max_num_batched_tokens=16)
    long = seq("long", 100)
    sched.add(long)
    finish_step(sched, sched.schedule())
    sched.add(seq("new", 3, arrival=1.0))
    batch = sched.schedule()
    new = dict(zip([s.request_id for s in batch.seqs], batch.num_new_tokens))
    # The newcomer's whole prompt runs now; the long prefill keeps the rest of the budget.
    assert new == {"long": 13, "new": 3}


def test_a_long_prompt_waiting_shares_the_budget_with_a_running_prefill() -> None:
    sched = make(max_num_batched_tokens=16)
    sched.add(seq("first", 100))
    finish_step(sched, sched.schedule())
    sched.add(seq("second", 100, arrival=1.0))
    batch = sched.schedule()
    assert dict(zip([s.request_id for s in batch.seqs], batch.num_new_tokens)) == {"first": 8, "second": 8}


def test_a_running_prefill_takes_the_whole_budget_when_nobody_can_be_admitted() -> None:
    sched = make(max_num_batched_tokens=16, max_num_seqs=1)
    sched.add(seq("long", 100))
    finish_step(sched, sched.schedule())
    sched.add(seq("queued", 3, arrival=1.0))  # over max_num_seqs: it cannot start this step
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["long"] and batch.num_new_tokens == [16]


def test_a_less_urgent_newcomer_does_not_take_an_urgent_prefills_budget() -> None:
    sched = make(max_num_batched_tokens=16)
    sched.add(seq("urgent", 100, priority=-1))
    finish_step(sched, sched.schedule())
    sched.add(seq("routine", 3, arrival=1.0))
    batch = sched.schedule()
    assert [s.request_id for s in batch.seqs] == ["urgent"] and batch.num_new_tokens == [16]
    sched.add(seq("as-urgent", 3, priority=-1, arrival=2.0))
    batch = sched.schedule()  # one as urgent waits: it gets the half kept back (the queue's head)
    new = dict(zip([s.request_id for s in batch.seqs], batch.num_new_tokens))
    assert new["as-urgent"] == 3 and new["urgent"] >= 8 and sum(new.values()) == 16
