"""Runs one engine step through the model: lay out the batch, forward, pick logits, sample.

The runner owns the model and the KV cache tensors. It knows nothing of queues or requests: the
engine hands it, per sequence, the tokens to compute this step and the block table to put them in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from leanserve.kernels.backend import trusted_inputs
from leanserve.model.attention import AttentionMetadata, DecodeGroup
from leanserve.model.config import ModelConfig
from leanserve.model.cuda_graphs import DecodeGraphs, DecodeInputs
from leanserve.model.llama import KVCache, LlamaForCausalLM
from leanserve.model.sampler import Sampler, SampleRequest, compute_top_logprobs

logger = logging.getLogger(__name__)


@dataclass
class StepSeq:
    """One sequence's share of a step."""

    token_ids: list[int]
    num_computed: int  # tokens already in the KV cache
    num_new: int  # tokens computed this step: token_ids[num_computed : num_computed + num_new]
    block_table: list[int]
    num_prompt_tokens: int
    sample: SampleRequest | None  # None while the chunk stops short of the last known token
    prompt_logprobs: int | None = None  # top-k alternatives wanted for prompt tokens in this chunk


@dataclass
class StepResult:
    token_id: int | None = None
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None
    # For prompt tokens num_computed+1 .. (within the prompt): (logprob of that token, top-k)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None


def consecutive_run(ids: list[int]) -> slice | None:
    """``ids`` as a slice when they are one consecutive ascending run (then a view replaces a gather)."""
    return slice(ids[0], ids[0] + len(ids)) if ids == list(range(ids[0], ids[0] + len(ids))) else None


def allocate_kv_cache(
    config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[KVCache]:
    shape = (num_blocks, block_size, config.num_key_value_heads, config.head_dim)
    return [
        (torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
        for _ in range(config.num_hidden_layers)
    ]


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        kv_caches: list[KVCache],
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.sampler = Sampler()
        self._gather_buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self.decode_graphs: DecodeGraphs | None = None

    def capture_decode_graphs(self, max_model_len: int, max_batch: int, use_graphs: bool = True) -> None:
        """Serve decode-only steps of up to ``max_batch`` sequences from captured CUDA graphs
        (``use_graphs=False``: the same padded static-buffer path, run eagerly)."""
        graphs = DecodeGraphs(
            self.model, self.kv_caches, self.block_size, max_model_len, max_batch, self.device, use_graphs
        )
        graphs.capture()
        self.decode_graphs = graphs

    @torch.inference_mode()
    def execute(self, seqs: list[StepSeq]) -> list[StepResult]:
        # Decodes first, shortest context first, so they form batched paged-decode calls over
        # similar lengths; prefill chunks after them.
        order = sorted(
            range(len(seqs)), key=lambda i: (seqs[i].num_new != 1, seqs[i].num_computed * (seqs[i].num_new == 1))
        )
        ordered = [seqs[i] for i in order]
        if self._graph_ready(ordered):
            return self._sample(ordered, order, self._run_decode_graph(ordered))
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        bs = self.block_size
        for s in ordered:
            start, end = s.num_computed, s.num_computed + s.num_new
            input_ids.extend(s.token_ids[start:end])
            positions.extend(range(start, end))
            table = s.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
        meta = self._attention_metadata(ordered, slots)
        dev = self.device
        # The metadata comes from the block manager: no per-layer host syncs to re-validate it.
        with trusted_inputs():
            hidden = self.model(
                torch.tensor(input_ids, device=dev),
                torch.tensor(positions, device=dev),
                self.kv_caches,
                meta,
            )
        return self._sample(ordered, order, hidden)

    def _graph_ready(self, ordered: list[StepSeq]) -> bool:
        graphs = self.decode_graphs
        return (
            graphs is not None
            and len(ordered) <= graphs.max_batch
            and all(s.num_new == 1 and s.prompt_logprobs is None for s in ordered)
        )

    def _run_decode_graph(self, ordered: list[StepSeq]) -> torch.Tensor:
        assert self.decode_graphs is not None
        bs = self.block_size
        positions = [s.num_computed for s in ordered]
        return self.decode_graphs.run(
            DecodeInputs(
                token_ids=[s.token_ids[p] for s, p in zip(ordered, positions, strict=True)],
                positions=positions,
                slots=[s.block_table[p // bs] * bs + p % bs for s, p in zip(ordered, positions, strict=True)],
                block_tables=[s.block_table for s in ordered],
                context_lens=[p + 1 for p in positions],
            )
        )

    def _attention_metadata(self, ordered: list[StepSeq], slots: list[int]) -> AttentionMetadata:
        dev = self.device
        decodes = [s for s in ordered if s.num_new == 1]
        prefills = ordered[len(decodes) :]

        def tables(group: list[StepSeq]) -> torch.Tensor:
            width = max((len(s.block_table) for s in group), default=0)
            rows = [s.block_table + [0] * (width - len(s.block_table)) for s in group]
            return torch.tensor(rows, dtype=torch.int32, device=dev).reshape(len(group), width)

        decode_lens = [s.num_computed + 1 for s in decodes]
        decode_tables = tables(decodes)
        groups = self._decode_groups(decodes, decode_lens) if dev.type == "cpu" and decodes else None
        cu = [0]
        for s in prefills:
            cu.append(cu[-1] + s.num_new)
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=dev),
            num_decode_tokens=len(decodes),
            decode_block_tables=decode_tables,
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.int32, device=dev),
            decode_max_context_len=max(decode_lens, default=0),
            prefill_block_tables=tables(prefills),
            prefill_cu_seqlens_q=torch.tensor(cu, dtype=torch.int32, device=dev),
            prefill_context_lens=torch.tensor(
                [s.num_computed + s.num_new for s in prefills], dtype=torch.int32, device=dev
            ),
            prefill_is_fresh=all(s.num_computed == 0 for s in prefills),
            decode_groups=groups,
        )

    def _decode_groups(self, decodes: list[StepSeq], lens: list[int]) -> list[DecodeGroup]:
        """Split the length-sorted decodes where a group's padded width would pass 1.5x its first
        member's: the attention reads (and gathers) only about what each group really needs."""
        bs = self.block_size
        groups: list[DecodeGroup] = []
        start = 0
        while start < len(decodes):
            first = len(decodes[start].block_table)
            end = start + 1
            while end < len(decodes) and len(decodes[end].block_table) <= max(first * 3 // 2, first + 2):
                end += 1
            members = decodes[start:end]
            width = max(len(s.block_table) for s in members)
            flat = [b for s in members for b in s.block_table + [0] * (width - len(s.block_table))]
            real = torch.tensor(lens[start:end])
            mask = (torch.arange(width * bs)[None, :] < real[:, None])[:, None, None, :]
            run = consecutive_run(flat)
            if run is not None:
                groups.append(DecodeGroup(start, end, run, mask))
            else:
                groups.append(DecodeGroup(start, end, torch.tensor(flat), mask, self._gather_buffer(len(flat))))
            start = end
        return groups

    def _gather_buffer(self, num_blocks: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of two persistent buffers holding ``num_blocks`` KV blocks; grown, never shrunk."""
        have = 0 if self._gather_buffers is None else self._gather_buffers[0].shape[0]
        if have < num_blocks:
            shape = (max(num_blocks, 64, have * 3 // 2), *self.kv_caches[0][0].shape[1:])
            dtype = self.kv_caches[0][0].dtype
            self._gather_buffers = (torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype))
        k, v = self._gather_buffers
        return k[:num_blocks], v[:num_blocks]

    def _sample(
        self, ordered: list[StepSeq], order: list[int], hidden: torch.Tensor
    ) -> list[StepResult]:
        results = [StepResult() for _ in ordered]
        offsets = []
        offset = 0
        for s in ordered:
            offsets.append(offset)
            offset += s.num_new
        sample_rows = [i for i, s in enumerate(ordered) if s.sample is not None]
        if sample_rows:
            last = [offsets[i] + ordered[i].num_new - 1 for i in sample_rows]
            run = consecutive_run(last)
            # Decode-only steps: the rows are already in place (no index copy to the device, no gather).
            rows = hidden[run] if run is not None else hidden.index_select(0, torch.tensor(last, device=self.device))
            logits = self.model.compute_logits(rows)
            out = self.sampler(logits, [ordered[i].sample for i in sample_rows])
            for j, i in enumerate(sample_rows):
                results[i].token_id = out.token_ids[j]
                results[i].logprob = out.logprobs[j]
                results[i].top_logprobs = out.top_logprobs[j]
        for i, s in enumerate(ordered):
            if s.prompt_logprobs is not None:
                chunk = hidden[offsets[i] : offsets[i] + s.num_new]
                results[i].prompt_logprobs = self._prompt_logprobs(s, chunk)
        unordered = [StepResult()] * len(ordered)
        for pos, original in enumerate(order):
            unordered[original] = results[pos]
        return unordered

    def _prompt_logprobs(
        self, s: StepSeq, hidden: torch.Tensor
    ) -> list[tuple[float, list[tuple[int, float]]]]:
        # Position p predicts token p + 1; keep those predictions that land inside the prompt.
        num = min(s.num_new, s.num_prompt_tokens - 1 - s.num_computed)
        if num <= 0:
            return []
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[:num]), dim=-1)
        targets = torch.tensor(
            s.token_ids[s.num_computed + 1 : s.num_computed + 1 + num], device=self.device
        )
        chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
        if s.prompt_logprobs:
            ids, values = compute_top_logprobs(logprobs, s.prompt_logprobs)
            tops = [list(zip(i, v, strict=False)) for i, v in zip(ids, values, strict=False)]
        else:
            tops = [[] for _ in range(num)]
        return list(zip(chosen, tops, strict=False))
