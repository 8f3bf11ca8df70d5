"""The synchronous engine: add requests, call ``step()`` until they finish.

One step = schedule a batch, run it through the model, then apply the sampled tokens: detokenize,
check stop conditions, free what finished. ``AsyncEngine`` drives this loop on a background thread.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoTokenizer

from leanserve.engine.batch_window import BatchWindowConfig
from leanserve.engine.block_manager import BlockManager
from leanserve.engine.config import EngineConfig
from leanserve.engine.cpu_threads import OtherCpuLoad, ThreadTuner
from leanserve.engine.detokenizer import IncrementalDetokenizer
from leanserve.engine.scheduler import Scheduler, SchedulerConfig
from leanserve.engine.sequence import FinishReason, Sequence, SequenceStatus
from leanserve.model.config import ModelConfig
from leanserve.model.loader import load_model
from leanserve.model.runner import ModelRunner, StepSeq, allocate_kv_cache
from leanserve.model.sampler import SampleRequest
from leanserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_CPU_KV_CAP_BYTES = 4 << 30


class RequestError(ValueError):
    """A request the engine cannot take (too long, malformed); the API turns it into a 400."""

    def __init__(self, message: str, code: str | None = None, param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


@dataclass
class TokenLogprob:
    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class RequestOutput:
    """What one step produced for one request (incremental: only what is new)."""

    request_id: str
    new_token_ids: list[int]
    text_delta: str
    logprobs: list[TokenLogprob] | None
    finished: bool
    finish_reason: str | None
    stop_reason: str | int | None
    num_prompt_tokens: int
    num_output_tokens: int
    num_cached_tokens: int
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, with the first output
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0
    # Mean logprob of the chosen tokens, on the finished output only: a cheap quality signal for
    # metrics, filled whether or not the request asked for logprobs.
    mean_logprob: float | None = None


@dataclass
class StepStats:
    """What the last step did, for metrics and the overhead report."""

    num_seqs: int = 0
    num_prefill_tokens: int = 0
    num_decode_tokens: int = 0
    num_preempted: int = 0
    step_seconds: float = 0.0
    forward_seconds: float = 0.0


def _available_memory(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].strip().split()[0]) * 1024


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = False) -> None:
        from leanserve.model.embedded import resolve_model_path

        self.config = config
        self.device = config.resolve_device()
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if self.device.type == "cpu":
            torch.set_num_threads(config.num_threads or cores)
        torch.manual_seed(config.seed)
        self.model_dir = Path(resolve_model_path(config.model, config.cache_dir))
        self.model_config = ModelConfig.from_pretrained(self.model_dir)
        awq = (self.model_config.quantization or {}).get("quant_method") == "awq"
        self.dtype = config.resolve_dtype(self.device, awq=awq)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.cpu_matmul_dtype = config.resolve_cpu_matmul_dtype(self.device, self.dtype)
        self.model = load_model(
            self.model_dir, self.device, self.dtype, progress=progress, cpu_matmul_dtype=self.cpu_matmul_dtype
        )
        self.weight_bytes: int = self.model.weight_bytes
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)

        num_blocks = self._num_kv_blocks()
        bs = config.block_size
        self.max_model_len = min(
            config.max_model_len or self.model_config.max_position_embeddings,
            self.model_config.max_position_embeddings,
            num_blocks * bs,
        )
        window = self.model_config.sliding_window
        if window is not None and window < self.max_model_len:
            # Our attention has no sliding-window mask: past the window it would attend to keys the
            # model never saw together. Serving only up to the window keeps every output exact.
            logger.warning(
                "model uses sliding-window attention (%d tokens), which is not implemented: "
                "max_model_len capped from %d to %d", window, self.max_model_len, window,
            )
            self.max_model_len = window
        kv = allocate_kv_cache(self.model_config, num_blocks, bs, self.dtype, self.device)
        self.runner = ModelRunner(self.model, kv, bs, self.device)
        if self.device.type == "cuda" and not config.enforce_eager:
            self.runner.capture_decode_graphs(
                self.max_model_len, min(config.max_num_seqs, config.max_cuda_graph_batch)
            )
        self.block_manager = BlockManager(
            num_blocks, bs, config.enable_prefix_caching, prefer_following=self.device.type == "cpu"
        )
        self.scheduler = Scheduler(
            SchedulerConfig(
                max_num_seqs=config.max_num_seqs,
                max_num_batched_tokens=config.resolve_max_num_batched_tokens(self.device),
                enable_chunked_prefill=config.enable_chunked_prefill,
                policy=config.batching,
                window=BatchWindowConfig(
                    max_batch_wait_ms=config.max_batch_wait_ms, adaptive=config.adaptive_batch_wait
                ),
            ),
            self.block_manager,
        )
        # With no thread count given, re-pick it while serving: a busy neighbour core can make every
        # extra thread a liability (see engine/cpu_threads.py).
        self.thread_tuner = (
            ThreadTuner(cores, self.model_config.hidden_size, self.model_config.intermediate_size,
                        load=OtherCpuLoad.create())
            if self.device.type == "cpu" and config.num_threads is None and cores > 1
            else None
        )
        self.seqs: dict[str, Sequence] = {}
        self.detokenizers: dict[str, IncrementalDetokenizer] = {}
        self.last_step = StepStats()
        logger.info(
            "KV cache: %d blocks = %d tokens = max concurrency %.1f at full context (%d tokens)",
            num_blocks, num_blocks * bs, num_blocks * bs / self.max_model_len, self.max_model_len,
        )

    def _num_kv_blocks(self) -> int:
        c = self.config
        bytes_per_block = self.model_config.kv_bytes_per_token(self.dtype.itemsize) * c.block_size
        budget = c.kv_cache_memory
        if isinstance(budget, float) and budget <= 1.0:
            budget = int(budget * _available_memory(self.device))
            if self.device.type == "cpu":
                budget = min(budget, _CPU_KV_CAP_BYTES)
        num_blocks = int(budget) // bytes_per_block
        if num_blocks < 1:
            raise ValueError(f"kv_cache_memory={c.kv_cache_memory} holds no {bytes_per_block}-byte block")
        return num_blocks

    # ---- requests -------------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        if not prompt_token_ids:
            raise RequestError("the prompt is empty", param="prompt")
        vocab = self.model_config.vocab_size
        bad = [t for t in prompt_token_ids if not 0 <= t < vocab]
        if bad:
            raise RequestError(f"token ids out of range [0, {vocab}): {bad[:5]}", param="prompt")
        total = len(prompt_token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                f"requested {total} tokens ({len(prompt_token_ids)} in the prompt, {params.max_tokens} "
                "for the completion). Please reduce the prompt or max_tokens.",
                code="context_length_exceeded",
                param="max_tokens",
            )

    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        if request_id in self.seqs:
            raise RequestError(f"duplicate request id {request_id!r}")
        self.validate(prompt_token_ids, params)
        seq = Sequence(request_id, list(prompt_token_ids), params, priority=priority)
        if arrival_time is not None:
            seq.arrival_time = arrival_time
        if params.prompt_logprobs is not None:
            seq.prompt_logprobs = [None]  # the first prompt token has no prediction
        self.seqs[request_id] = seq
        self.detokenizers[request_id] = IncrementalDetokenizer(
            self.tokenizer,
            seq.prompt_token_ids,
            stop=list(params.stop),
            include_stop_str_in_output=params.include_stop_str_in_output,
            skip_special_tokens=params.skip_special_tokens,
        )
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> RequestOutput | None:
        seq = self.seqs.get(request_id)
        if seq is None:
            return None
        self._finish(seq, FinishReason.ABORT)
        return self._output(seq, [], None)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_work

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        if self.thread_tuner is not None:
            self.thread_tuner.maybe_retune()
        start = time.perf_counter()
        batch = self.scheduler.schedule()
        stats = StepStats(num_preempted=len(batch.preempted))
        if not batch:
            self.last_step = stats
            return []
        now = time.monotonic()
        step_seqs = []
        for seq, num_new in zip(batch.seqs, batch.num_new_tokens, strict=False):
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = now
            reaches_end = seq.num_computed_tokens + num_new == len(seq.token_ids)
            want_prompt = self._chunk_adds_prompt_logprobs(seq, num_new)
            step_seqs.append(
                StepSeq(
                    token_ids=seq.token_ids,
                    num_computed=seq.num_computed_tokens,
                    num_new=num_new,
                    block_table=seq.block_table,
                    num_prompt_tokens=seq.num_prompt_tokens,
                    sample=SampleRequest(
                        seq.params, seq.token_ids, seq.num_prompt_tokens, self._blocked_token_ids(seq)
                    )
                    if reaches_end
                    else None,
                    prompt_logprobs=seq.params.prompt_logprobs if want_prompt else None,
                )
            )
            if num_new == 1:
                stats.num_decode_tokens += 1
            else:
                stats.num_prefill_tokens += num_new
        forward_start = time.perf_counter()
        results = self.runner.execute(step_seqs)
        stats.forward_seconds = time.perf_counter() - forward_start
        outputs = []
        now = time.monotonic()
        for seq, num_new, result in zip(batch.seqs, batch.num_new_tokens, results, strict=False):
            if result.prompt_logprobs:
                # The chunk starts at num_computed_tokens; after a preemption its first positions
                # may predict tokens that already have their logprobs.
                known = len(seq.prompt_logprobs) - 1 - seq.num_computed_tokens
                seq.prompt_logprobs.extend(
                    TokenLogprob(seq.token_ids[len(seq.prompt_logprobs)], lp, top)
                    for lp, top in result.prompt_logprobs[known:]
                )
            seq.num_computed_tokens += num_new
            if result.token_id is None:
                self.block_manager.cache_full_blocks(seq)
                continue
            if seq.params.max_tokens == 0:  # prompt scoring only (echo with max_tokens=0)
                self._finish(seq, FinishReason.LENGTH)
                outputs.append(self._output(seq, [], None))
                continue
            if seq.first_token_time is None:
                seq.first_token_time = now
            token = result.token_id
            seq.token_ids.append(token)
            seq.output_logprobs.append(result.logprob)
            logprob = TokenLogprob(token, result.logprob, result.top_logprobs or [])
            self.block_manager.cache_full_blocks(seq)
            reason = self._check_stop(seq, token)
            if reason is not None:
                self._finish(seq, reason)
            outputs.append(
                self._output(seq, [token], [logprob] if seq.params.logprobs is not None else None)
            )
        stats.num_seqs = len(batch.seqs)
        stats.step_seconds = time.perf_counter() - start
        self.last_step = stats
        return outputs

    @staticmethod
    def _chunk_adds_prompt_logprobs(seq: Sequence, num_new: int) -> bool:
        """Whether this chunk computes the next prompt token's missing prediction: position
        ``len(prompt_logprobs) - 1`` predicts it. After a preemption the recompute restarts at 0 (or
        wherever its chunks fall), so the chunk need only cover that position, not start at it."""
        if seq.prompt_logprobs is None:
            return False
        position = len(seq.prompt_logprobs) - 1
        return position < seq.num_prompt_tokens - 1 and (
            seq.num_computed_tokens <= position < seq.num_computed_tokens + num_new
        )

    def _blocked_token_ids(self, seq: Sequence) -> tuple[int, ...]:
        """The ids that would end ``seq`` but may not yet: the next token is short of ``min_tokens``."""
        p = seq.params
        if seq.num_output_tokens >= p.min_tokens:
            return ()
        eos = () if p.ignore_eos else tuple(self.eos_token_ids)
        return eos + tuple(p.stop_token_ids)

    def _check_stop(self, seq: Sequence, token: int) -> FinishReason | None:
        p = seq.params
        # vLLM's min_tokens: the request has at least min_tokens tokens when it ends. Stop tokens were
        # blocked before sampling them; a stop string is looked for once min_tokens are out (it may end
        # in the min_tokens-th, as in vLLM: the output then still holds min_tokens tokens).
        may_stop = seq.num_output_tokens >= p.min_tokens
        stop_string = self.detokenizers[seq.request_id].add_token(token, check_stop=may_stop)
        if stop_string is not None:
            seq.stop_reason = stop_string
            return FinishReason.STOP
        if may_stop:
            if not p.ignore_eos and token in self.eos_token_ids:
                seq.stop_reason = token
                return FinishReason.STOP
            if token in p.stop_token_ids:
                seq.stop_reason = token
                return FinishReason.STOP
        if seq.num_output_tokens >= p.max_tokens or len(seq.token_ids) >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.scheduler.remove(seq)

    def _output(
        self, seq: Sequence, new_tokens: list[int], logprobs: list[TokenLogprob] | None
    ) -> RequestOutput:
        finished = seq.is_finished
        detok = self.detokenizers[seq.request_id]
        out = RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_tokens,
            text_delta=detok.take_delta(finished),
            logprobs=logprobs,
            finished=finished,
            finish_reason=seq.finish_reason.value if finished else None,
            stop_reason=seq.stop_reason,
            num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            num_cached_tokens=seq.num_cached_tokens,
            arrival_time=seq.arrival_time,
            first_scheduled_time=seq.first_scheduled_time,
            first_token_time=seq.first_token_time,
            num_preemptions=seq.num_preemptions,
        )
        if seq.prompt_logprobs is not None and not seq.prompt_logprobs_sent:
            out.prompt_logprobs = seq.prompt_logprobs
            seq.prompt_logprobs_sent = True
        if finished:
            chosen = [lp for lp in seq.output_logprobs if lp is not None]
            if chosen:
                out.mean_logprob = sum(chosen) / len(chosen)
            del self.seqs[seq.request_id]
            del self.detokenizers[seq.request_id]
        return out
