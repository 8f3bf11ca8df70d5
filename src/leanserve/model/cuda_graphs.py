"""CUDA graphs for decode-only steps.

On a GPU a decode step of a ~1B model is a few hundred small kernels; launched one by one from Python
their launch overhead is larger than their run time. Each bucketed batch size gets its forward pass
captured once at start-up and replayed per step, so a step costs one graph launch plus the copies of
its inputs into static buffers.

A step of ``n`` decodes replays the smallest bucket ``b >= n``. Rows ``n..b`` are padding that can
touch nothing: slot ``-1`` (the KV write skips it) and context length 0 (attention gives zeros).
Steps with prefill chunks, prompt logprobs or more decodes than the largest bucket run eagerly.

A graph fixes every launch parameter, so the decode kernel's split-KV layout is sized for the
longest context the table can hold (``max_model_len``); partitions past a sequence's own context
exit at once. Graphs share one memory pool, captured largest first so the smaller ones reuse it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from leanserve.kernels.backend import trusted_inputs
from leanserve.model.attention import AttentionMetadata
from leanserve.model.llama import KVCache, LlamaForCausalLM

logger = logging.getLogger(__name__)


def decode_buckets(max_batch: int) -> list[int]:
    """Batch sizes to capture: 1, 2, 4, then every multiple of 8 up to ``max_batch`` (and it)."""
    sizes = [b for b in (1, 2, 4) if b < max_batch] + list(range(8, max_batch, 8)) + [max_batch]
    return sorted(set(sizes))


@dataclass
class DecodeInputs:
    """One decode step on the host, one entry per sequence."""

    token_ids: list[int]
    positions: list[int]
    slots: list[int]
    block_tables: list[list[int]]
    context_lens: list[int]


class DecodeGraphs:
    """Static input buffers and one captured forward per bucket.

    With ``use_graphs=False`` the same padded static-buffer forward runs eagerly: that is how the
    padding and buffer handling are tested on machines without CUDA.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        block_size: int,
        max_model_len: int,
        max_batch: int,
        device: torch.device,
        use_graphs: bool = True,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.use_graphs = use_graphs
        self.buckets = decode_buckets(max_batch)
        self.max_blocks = -(-max_model_len // block_size)
        size = self.buckets[-1]
        # The step's inputs live in two device buffers, one per dtype, each filled by one copy from a
        # host staging buffer (pinned on CUDA, so the copy is asynchronous): token ids, positions and
        # slots as int64 rows; context lengths then block tables as int32.
        self._int64 = torch.zeros((3, size), dtype=torch.int64, device=device)
        self._int32 = torch.zeros(size + size * self.max_blocks, dtype=torch.int32, device=device)
        self.input_ids, self.positions, self.slots = self._int64
        self.slots.fill_(-1)
        self.context_lens = self._int32[:size]
        self.block_tables = self._int32[size:].view(size, self.max_blocks)
        pin = device.type == "cuda"
        self._host_int64 = torch.zeros((3, size), dtype=torch.int64, pin_memory=pin)
        self._host_int32 = torch.zeros(size + size * self.max_blocks, dtype=torch.int32, pin_memory=pin)
        # numpy views of them, which take Python lists in one assignment
        self._host_rows = self._host_int64.numpy()
        self._host_lens = self._host_int32[:size].numpy()
        self._host_tables = self._host_int32[size:].view(size, self.max_blocks).numpy()
        self._empty_tables = torch.zeros((0, self.max_blocks), dtype=torch.int32, device=device)
        self._empty_cu = torch.zeros(1, dtype=torch.int32, device=device)
        self._empty_lens = torch.zeros(0, dtype=torch.int32, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    @property
    def max_batch(self) -> int:
        return self.buckets[-1]

    def bucket_for(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def _metadata(self, size: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:size],
            num_decode_tokens=size,
            decode_block_tables=self.block_tables[:size],
            decode_context_lens=self.context_lens[:size],
            decode_max_context_len=self.max_blocks * self.block_size,
            prefill_block_tables=self._empty_tables,
            prefill_cu_seqlens_q=self._empty_cu,
            prefill_context_lens=self._empty_lens,
            prefill_is_fresh=True,
        )

    def _forward(self, size: int) -> torch.Tensor:
        with trusted_inputs():  # the runner fills the buffers from the block manager's tables
            return self.model(self.input_ids[:size], self.positions[:size], self.kv_caches, self._metadata(size))

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket (the buffers hold padding only, so nothing is written)."""
        if not self.use_graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.buckets):
            # Eager warm-up: compiles the Triton kernels and runs their one-time value checks, neither
            # of which may happen inside a capture.
            self._forward(size)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[size] = self._forward(size)
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs, batch sizes %s", len(self.graphs), self.buckets)

    def run(self, inputs: DecodeInputs) -> torch.Tensor:
        """Final hidden states ``[n, hidden]`` of the step's ``n`` decodes (valid until the next run).

        The host buffers are rewritten every step: the step before has finished with them, since its
        sampled tokens were read back (a sync) before this step was scheduled. A scheduler that overlaps
        steps must first wait for the previous copies. The tables go over at full width, ``n x
        max_blocks`` int32 (one copy with the lengths instead of two): 512 B a row for a 2048-token
        ``max_model_len``, 32 KiB for 131072."""
        n = len(inputs.token_ids)
        size = self.bucket_for(n)
        rows, lens, tables = self._host_rows, self._host_lens, self._host_tables
        # Padding rows ride along in the same copies: token 0 at position 0, slot -1, context 0.
        rows[0, :n], rows[1, :n], rows[2, :n] = inputs.token_ids, inputs.positions, inputs.slots
        rows[:2, n:size], rows[2, n:size] = 0, -1
        lens[:n], lens[n:size] = inputs.context_lens, 0
        # Entries past a table's own length keep what earlier steps left: no kernel reads past a context.
        for row, table in enumerate(inputs.block_tables):
            tables[row, : len(table)] = table
        self._int64.copy_(self._host_int64, non_blocking=True)
        used = self.max_batch + n * self.max_blocks  # the lengths, then the tables' first n rows
        self._int32[:used].copy_(self._host_int32[:used], non_blocking=True)
        if not self.use_graphs:
            return self._forward(size)[:n]
        self.graphs[size].replay()
        return self.outputs[size][:n]
