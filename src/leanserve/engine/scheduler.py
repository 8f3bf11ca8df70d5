"""Continuous batching: which sequences run in the next forward pass, and how many tokens each.

Every step has a token budget (``max_num_batched_tokens``) and a sequence cap (``max_num_seqs``).
Running decodes go first, one token each, so a long prompt never stalls anyone's next token. Running
prefills come next, in priority order, each taking the next chunk that fits (chunked prefill); while
requests wait, they take at most half of what is left, so that a new prompt starts beside a long one
rather than after it. Then waiting sequences are admitted while blocks, budget and the cap allow, and
whatever budget admission leaves goes back to the running prefills. A sequence leaves the moment it
finishes. When a running sequence needs a block and none is free, the lowest-priority,
latest-arrived running sequence is preempted: its blocks are freed and it returns to the head of the
queue to be recomputed later (its tokens so far are kept, so its output is unchanged).
"""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from leanserve.engine.batch_window import BatchWindow, BatchWindowConfig
from leanserve.engine.block_manager import BlockManager
from leanserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    # Blocks kept free at admission so that running sequences can grow without instant preemption.
    watermark_blocks: int = 1
    # "continuous": admit at every step. "static": admit only when the whole previous batch has
    # finished (the baseline that continuous batching is measured against).
    policy: str = "continuous"
    window: BatchWindowConfig = field(default_factory=BatchWindowConfig)


@dataclass
class ScheduledBatch:
    seqs: list[Sequence] = field(default_factory=list)
    num_new_tokens: list[int] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(self.num_new_tokens)

    def __bool__(self) -> bool:
        return bool(self.seqs)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: list[Sequence] = []  # sorted by (priority, arrival)
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._preempted_this_step: list[Sequence] = []
        self.window = BatchWindow(config.window)
        # Seconds the oldest new request is being held by the batching window (0 when none is).
        self.admission_hold_s = 0.0

    # ---- queue ----------------------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        if seq.num_preemptions == 0:
            self.window.observe_arrival(time.monotonic())
        seq.status = SequenceStatus.WAITING
        keys = [s.sort_key for s in self.waiting]
        self.waiting.insert(bisect.bisect_right(keys, seq.sort_key), seq)

    def remove(self, seq: Sequence) -> None:
        """Take ``seq`` out of the queues and free its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- one step -------------------------------------------------------------------------------
    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self.running.sort(key=lambda s: s.sort_key)
        scheduled: set[int] = set()
        budget = self._schedule_running(batch, scheduled, self.config.max_num_batched_tokens, decodes=True)
        # Half of what is left is kept for admission while someone waits who is as urgent as the running
        # prefills: a 6000-token prompt in 256-token chunks would otherwise hold every new request's
        # first token for its whole prefill.
        reserve = budget // 2 if self._admission_may_share(scheduled) else 0
        budget = self._schedule_running(batch, scheduled, budget - reserve, decodes=False) + reserve
        batch.preempted = self._preempted_this_step
        self._preempted_this_step = []
        if not batch.preempted:  # memory is tight after a preemption: admit nobody until it eases
            budget = self._admit(batch, budget)
        self._extend_prefills(batch, budget)
        return batch

    def _admission_may_share(self, scheduled: set[int]) -> bool:
        """Whether the waiting head may take budget from the running prefills: nobody was preempted this
        step (memory is tight), and no running prefill outranks it."""
        if not self.waiting or self._preempted_this_step:
            return False
        head = self.waiting[0].priority
        return all(head <= s.priority for s in self.running if id(s) not in scheduled)

    def _schedule_running(self, batch: ScheduledBatch, scheduled: set[int], budget: int, decodes: bool) -> int:
        """Schedule the running decodes (``decodes``) or prefills in priority order; the budget left."""
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            if id(seq) in scheduled or (seq.num_uncomputed_tokens == 1) != decodes:
                i += 1
                continue
            if not self._make_room_for(seq, scheduled):
                continue  # seq itself was preempted; the list shifted under i
            num_new = min(seq.num_uncomputed_tokens, budget)
            self.block_manager.append_slot(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            scheduled.add(id(seq))
            budget -= num_new
            i += 1
        return budget

    @staticmethod
    def _extend_prefills(batch: ScheduledBatch, budget: int) -> None:
        """Give budget nobody took to the scheduled prefills' chunks, in batch order. A running sequence
        holds blocks for all its tokens, so a longer chunk needs none."""
        for j, seq in enumerate(batch.seqs):
            if budget <= 0:
                return
            extra = min(seq.num_uncomputed_tokens - batch.num_new_tokens[j], budget)
            if extra > 0:
                batch.num_new_tokens[j] += extra
                budget -= extra

    def _make_room_for(self, seq: Sequence, scheduled: set[int]) -> bool:
        """Preempt until ``seq`` can take its next slot; False if ``seq`` itself had to go."""
        while not self.block_manager.can_append(seq):
            victim = max(
                (s for s in self.running if id(s) not in scheduled), key=lambda s: s.sort_key
            )
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted_this_step.append(seq)
        self.add(seq)

    def _hold_for_window(self, budget: int) -> bool:
        """Whether the batching window keeps new requests waiting a little longer this step."""
        self.admission_hold_s = 0.0
        head = self.waiting[0] if self.waiting else None
        if head is None or head.num_preemptions:
            return False  # a preempted sequence has waited enough
        free_slots = self.config.max_num_seqs - len(self.running)
        waiting_tokens = 0
        for seq in self.waiting[:free_slots]:
            waiting_tokens += seq.num_uncomputed_tokens
            if waiting_tokens >= budget:
                break
        hold = self.window.hold_seconds(
            time.monotonic(),
            head.arrival_time,
            running_fraction=len(self.running) / self.config.max_num_seqs,
            queue_fills_step=waiting_tokens >= budget or len(self.waiting) >= free_slots,
        )
        self.admission_hold_s = hold
        return hold > 0

    def _admit(self, batch: ScheduledBatch, budget: int) -> int:
        """Admit waiting sequences while blocks, ``budget`` and the cap allow; the budget left."""
        if self.config.policy == "static" and self.running:
            return budget
        if self._hold_for_window(budget):
            return budget
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            reserve = self.config.watermark_blocks if self.running else 0
            if not self.block_manager.can_allocate(seq, reserve=reserve):
                break
            self.block_manager.allocate(seq)
            num_new = seq.num_uncomputed_tokens
            if num_new > budget and not self.config.enable_chunked_prefill:
                if batch.seqs:
                    self.block_manager.free(seq)
                    return budget
                # Without chunking, a prompt over the budget still has to run whole, alone.
                budget = num_new
            num_new = min(num_new, budget)
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            batch.seqs.append(seq)
            batch.num_new_tokens.append(num_new)
            budget -= num_new
        return budget
