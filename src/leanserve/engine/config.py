"""Engine settings: what to load, on what, and how much memory and batching to allow."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    model: str | None = None  # a checkpoint folder, a .gguf file, or None for the embedded model
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (fp32 on CPU, bf16 on CUDA) | float32 | bfloat16 | float16
    block_size: int = 16
    # KV cache budget: an int is bytes; a float in (0, 1] is a fraction of the free device memory.
    kv_cache_memory: float | int = 0.9
    max_num_seqs: int = 64
    # Tokens in one step, prefill chunks included. None: 256 on CPU, where a step is compute-bound
    # and a smaller budget interleaves prompts with decodes (TTFT p50 at 16 concurrent streams fell
    # from 2.3 s at 2048 to 0.6 s at 256, with higher throughput); 2048 on CUDA.
    max_num_batched_tokens: int | None = None
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    num_threads: int | None = None  # torch intra-op threads on CPU; default: all cores
    cache_dir: str | None = None  # where converted checkpoints (GGUF -> safetensors) are kept
    seed: int = 0
    # CUDA only: decode-only steps of up to this many sequences replay captured CUDA graphs (see
    # model/cuda_graphs.py); enforce_eager turns them off.
    enforce_eager: bool = False
    max_cuda_graph_batch: int = 256
    # Batching: "continuous" or "static" (admit only when the previous batch is done), and the
    # adaptive batching window (see engine/batch_window.py).
    batching: str = "continuous"
    max_batch_wait_ms: float = 20.0
    adaptive_batch_wait: bool = True

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_max_num_batched_tokens(self, device: torch.device) -> int:
        if self.max_num_batched_tokens is not None:
            return self.max_num_batched_tokens
        return 2048 if device.type == "cuda" else 256

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            # bf16 has no hardware support on the CPUs we serve from and ran ~3x slower than fp32.
            return torch.bfloat16 if device.type == "cuda" else torch.float32
        return getattr(torch, self.dtype)
